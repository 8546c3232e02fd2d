"""Endless token generation: one stream's handle, to read and steer it.

A `TokenStream` writes frames forever: its `DecodeBatch` (a lone stream: a batch of one, made
here) steps it with the other streams of the batch, and its lane (`engine.lane.Lane`: windows,
continuation, rows, history) keeps its state. Through the handle the stream's owner reads
frames (`generate_until`, `history`) and changes what it plays from a chosen frame on: a prompt
or blend (`set_prompt`, gliding over `glide_frames` when asked), a seed (`seed`: the context
becomes given tokens, an uploaded clip), a restart (`restart`: a seed of the stream's own last
frames, as many as asked, none for the text alone: after a step that raised, or to leave a stuck
passage with a short, fresh context), its sampling settings (`set_sampling`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.batch import DecodeBatch
from engine.conditioning import TextCondition
from engine.decoder import Decoder
from engine.lane import Prefill
from engine.options import SamplingOptions, WindowOptions
from engine.rows import Prompt


class Interrupted(Exception):
    """A read stopped between two decoder steps because its caller asked (a radio's prompt
    change, whose new audio the read's would not be): nothing was returned, the frames made
    stay made, and the next read goes on from them."""


def as_prompt(prompt: TextCondition | Prompt) -> Prompt:
    """A condition is the plain prompt of one text."""
    return prompt if isinstance(prompt, Prompt) else Prompt.of(prompt)


class TokenStream:
    def __init__(
        self,
        decoder: Decoder,
        condition: TextCondition | Prompt,
        sampling: SamplingOptions,
        window: WindowOptions,
        *,
        audio_channels: int,
        keep_frames: int = 1000,
        prompt_frames: torch.Tensor | None = None,
        batch: DecodeBatch | None = None,
        compile: str = "none",
    ) -> None:
        """`condition`: a text's condition, or a `Prompt` (a blend of them);
        `prompt_frames`: optional [K, T] tokens to continue from (frames 0..T-1 of the stream);
        `batch`: share decoder steps with the other streams of a `DecodeBatch` (None: a batch
        of one); `compile`: "none", or how a lone stream runs `engine.static_step`."""
        window = window.validate(decoder.max_positions)
        if batch is None:
            batch = DecodeBatch(decoder, window, 1, compile)
        elif batch.decoder is not decoder or batch.window != window:
            raise ValueError("every stream of a batch uses the batch's decoder and window options")
        self._batch = batch
        self._lane = batch.open(
            as_prompt(condition),
            sampling,
            audio_channels=audio_channels,
            keep_frames=keep_frames,
            prompt_frames=prompt_frames,
        )

    # -- reading ---------------------------------------------------------------------------

    @property
    def complete(self) -> int:
        """Number of complete frames written since the stream began."""
        return self._lane.complete

    def history(self) -> tuple[torch.Tensor, int]:
        """(tokens [K, T], offset): the kept complete frames; tokens[:, i] is frame offset + i."""
        return self._lane.history()

    @torch.inference_mode()
    def generate_until(self, frame: int, interrupt: Callable[[], bool] | None = None) -> None:
        """Step the batch until at least `frame` frames of this stream are complete. With
        `interrupt`, asked before each step: when it says True, `Interrupted` is raised (the
        frames made so far stay made)."""
        while self._lane.complete < frame:
            if interrupt is not None and interrupt():
                raise Interrupted(f"interrupted at frame {self._lane.complete} of {frame}")
            self._batch.step()

    @property
    def sampling(self) -> SamplingOptions:
        return self._lane.sampling

    @property
    def window(self) -> WindowOptions:
        return self._lane.window

    @property
    def position(self) -> int:
        """Its position in the current window: the next step feeds it."""
        return self._lane.position

    @property
    def prompt(self) -> Prompt:
        """What it plays (the latest change's prompt; during a glide, where it goes)."""
        return self._lane.prompt

    @property
    def rows(self) -> int:
        """Decoder rows it holds now: one per text (both blends' during a glide), the null row."""
        return self._lane.rows.count

    @property
    def guided_next(self) -> bool:
        """Whether its next window holds the null row: what a prompt change prefills now (one
        row per text, and this one), and what warm rows begun now are built with. False while
        guidance is off for it or dropped (`MusicModel.drop_guidance`); True again as soon as
        guidance is wanted back, before its rows take the null row back."""
        return self._lane.guided_next

    @property
    def steps(self) -> int:
        """Decoder steps it took part in."""
        return self._lane.steps

    @property
    def cross_read(self) -> tuple[int, bool]:
        """(bytes, folded) a decode step of its batch reads for the cross-attention's
        projections, or the attention folded into the text (`Decoder.cross_read`)."""
        return self._batch.decoder.cross_read(self._batch.cross)

    @property
    def prefills(self) -> int:
        """Windows it prefilled: its first, window restarts, prompt changes, seeds."""
        return self._lane.prefills

    @property
    def folds(self) -> int:
        """Texts its batch folded into the cross-attention after a prefill (`DecodeBatch`'s
        `FOLD_AFTER_STEPS`: tens of ms in the read that does it), every stream's of the batch."""
        return self._batch.folds

    @property
    def warming(self) -> bool:
        """Whether its warm rows are being fed now (the next window, built beside this one:
        its steps cost more until the window restarts)."""
        return self._lane.warm is not None

    @property
    def warm_restarts(self) -> int:
        """Window restarts that took the warm rows' window and prefilled nothing."""
        return self._lane.warm_restarts

    @property
    def restart_context(self) -> int | None:
        """Frames every window restart re-reads while shortened (None: the window's context)."""
        return self._lane.restart_context

    @property
    def window_frames(self) -> int | None:
        """Positions every window spans while shortened (None: the window's `window`)."""
        return self._lane.window_frames

    def shorten_windows(self, frames: int | None) -> None:
        """From the next window on, end each window at position `frames` (None: at `window`
        again): steps attend over fewer positions, so they cost less; the music's memory is
        shorter. A window still makes at least a second beyond its context."""
        if frames is not None and not 1 <= frames <= self.window.window:
            raise ValueError(f"frames must be in [1, {self.window.window}] or None, got {frames}")
        self._lane.window_frames = frames

    def shorten_restarts(self, frames: int | None) -> None:
        """From the next window restart on, re-read at most `frames` of the context (None: the
        whole `context` again). Prompt changes keep their own `change_context` when shorter."""
        if frames is not None and not 1 <= frames <= self.window.context:
            raise ValueError(f"frames must be in [1, {self.window.context}] or None, got {frames}")
        self._lane.restart_context = frames

    @property
    def last_prefill(self) -> Prefill | None:
        """The latest prefill as it ran (seconds, rows, frames); None before the first."""
        return self._lane.last_prefill

    @property
    def seed_frames(self) -> torch.Tensor | None:
        """[K, S] the latest seed's tokens while the decoder's context still holds them."""
        return self._lane.seed_frames

    @property
    def seeded_at(self) -> int:
        """The frame of the latest seed (0: none); no rewind reaches before it."""
        return self._lane.seeded_at

    def conditions_in_use(self) -> list[TextCondition]:
        """The conditions its rows and the changes a rewind can reach still hold."""
        return self._lane.conditions_in_use()

    # -- steering --------------------------------------------------------------------------

    @torch.inference_mode()
    def set_prompt(
        self,
        prompt: TextCondition | Prompt,
        from_frame: int,
        glide_frames: int = 0,
        context_frames: int | None = None,
    ) -> int:
        """Continue with `prompt` from `from_frame`; frames beyond it are dropped. With
        `glide_frames` > 0 the weights glide from the blend heard before `from_frame` to
        `prompt` over that many frames: both blends' rows are prefilled now, and the rows of
        weight 0 leave once the glide is over. The prefill re-reads the last `context_frames`
        (default: the window's `change_context`; 0: the text alone). Returns the frame from
        which it is heard."""
        if glide_frames < 0:
            raise ValueError(f"glide_frames must be >= 0, got {glide_frames}")
        keep = self.window.change_context if context_frames is None else context_frames
        if not 0 <= keep <= self.window.context:
            raise ValueError(f"context_frames must be in [0, {self.window.context}], got {keep}")
        self._rewind_to(from_frame)
        self._lane.set_prompt(as_prompt(prompt), from_frame, glide_frames, keep)
        self._batch.restart(self._lane)
        return from_frame

    @torch.inference_mode()
    def seed(
        self, frames: torch.Tensor, prompt: TextCondition | Prompt | None, from_frame: int
    ) -> int:
        """Continue from `from_frame` as if the frames before it were `frames` [K, S] (a clip's
        tokens), with `prompt` (None: the current one). The frames already made before
        `from_frame` stay in `history()` (the codec decodes what was heard); only the decoder's
        context changes, as `generate(decoder_input_ids=frames)` would continue. Frames before
        `from_frame` can no longer be rewound to. Returns `from_frame`."""
        k = self._lane.num_codebooks
        if frames.ndim != 2 or frames.shape[0] != k or frames.shape[1] < 1:
            raise ValueError(f"seed frames must be [{k}, T >= 1], got {list(frames.shape)}")
        return self._continue_from(frames, prompt, from_frame)

    @torch.inference_mode()
    def restart(
        self,
        from_frame: int,
        context_frames: int | None = None,
        prompt: TextCondition | Prompt | None = None,
    ) -> int:
        """Re-prefill from the stream's own frames: continue from `from_frame` (at most the frames
        made) with the last `context_frames` (default: the window's `context`; 0: none, the text
        alone) of what a window restart there would continue from, and `prompt` (None: the
        current one). A seed of the stream's own recent tokens: the KV cache and the pending
        positions are rebuilt, the frames before `from_frame` stay. Returns `from_frame`."""
        keep = self.window.context if context_frames is None else context_frames
        if not 0 <= keep <= self.window.context:
            raise ValueError(f"context_frames must be in [0, {self.window.context}], got {keep}")
        if from_frame > self.complete:
            raise ValueError(f"from_frame {from_frame} is beyond the frames made ({self.complete})")
        self._lane.check_rewind(from_frame)
        self._lane.truncate(from_frame)
        context = self._lane.context()  # [K, <= context]: fewer when older frames are gone
        recent = context[:, max(context.shape[1] - keep, 0) :]
        return self._continue_from(recent, prompt, from_frame)

    def _continue_from(
        self, frames: torch.Tensor, prompt: TextCondition | Prompt | None, from_frame: int
    ) -> int:
        """`seed` and `restart`: frames [K, S >= 0] become the decoder's context at `from_frame`."""
        self._rewind_to(from_frame)
        self._lane.seed(frames, from_frame)
        if prompt is not None:
            self._lane.set_prompt(as_prompt(prompt), from_frame)
        self._batch.restart(self._lane)
        return from_frame

    @torch.inference_mode()
    def set_sampling(self, sampling: SamplingOptions, from_frame: int | None = None) -> None:
        """Change sampling settings. Turning guidance on or off for a lone stream adds or drops
        its null row: a continuation from `from_frame` (default: the last complete frame)."""
        sampling = sampling.validate()
        guided = self._batch.guided_for(sampling)
        frame = self._lane.complete if from_frame is None else from_frame
        if guided != self._lane.rows.guided:
            self._lane.check_rewind(frame)
        if self._lane.set_sampling(sampling, guided):
            self._lane.truncate(frame)
            self._batch.restart(self._lane)

    def _rewind_to(self, frame: int) -> None:
        """Make the frames up to `frame` and drop those after it."""
        self._lane.check_rewind(frame)
        self.generate_until(frame)
        self._lane.truncate(frame)
