"""Endless token generation: windows, continuation, live prompt and sampling changes.

A `TokenStream` writes frames forever. Inside a window it runs one decoder step per position
with the KV cache. The sinusoidal position table is finite (2048) and training clips were 30 s,
so when a window is full the stream restarts positions at 0 and re-prefills the last `context`
frames as a prompt: `generate_continuation` on tokens, the same as passing them to the
reference's `generate(decoder_input_ids=...)`. No audio is re-encoded, so nothing is lost at a
join. A prompt change is the same continuation with new text, from a chosen frame. A seed
(`seed`) is one whose context is given tokens (an uploaded clip) instead of the frames before;
a restart (`restart`) is a seed of the stream's own last frames, as many as asked (none: the text
alone): after a step that raised, or to leave a stuck passage with a short, fresh context.

Frames are numbered from the start of the stream. `history()` holds the last frames (enough for
rewinds, re-prefills and the codec's left context); older ones are forgotten, so memory is flat.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from engine.conditioning import TextCondition, batch_conditions
from engine.decoder import CrossKV, Decoder
from engine.delay import PAD, codebook_delays, delayed_layout
from engine.options import SamplingOptions, WindowOptions
from engine.sampling import sample_streams
from engine.static_step import StaticStep

if TYPE_CHECKING:
    from engine.batch import DecodeBatch

log = logging.getLogger(__name__)


class TokenStream:
    def __init__(
        self,
        decoder: Decoder,
        condition: TextCondition,
        sampling: SamplingOptions,
        window: WindowOptions,
        *,
        audio_channels: int,
        keep_frames: int = 1000,
        prompt_frames: torch.Tensor | None = None,
        batch: DecodeBatch | None = None,
        compile: str = "none",
    ) -> None:
        """`prompt_frames`: optional [K, T] tokens to continue from (frames 0..T-1 of the stream).
        `batch`: share decoder steps with the other streams of a `DecodeBatch`.
        `compile`: "none", or how a lone stream runs `engine.static_step` ("compile", "graphs")."""
        self.decoder = decoder
        self.window = window.validate(decoder.max_positions)
        self.sampling = sampling.validate()
        self.num_codebooks = decoder.num_codebooks
        self.delays = codebook_delays(self.num_codebooks, audio_channels)  # [K]
        self.max_delay = int(self.delays.max())
        self.keep_frames = max(keep_frames, window.context)
        self.generator = self._make_generator(sampling.seed)
        self.condition = condition
        self.steps = 0  # decoder steps run, for statistics
        self.prefills = 0  # window restarts and prompt changes
        self.prefill_seconds = 0.0  # wall time of the last prefill of a whole context (0: none yet)
        # Complete frames [K, T] on the CPU; _history[:, i] is frame _offset + i.
        self._history = torch.zeros(self.num_codebooks, 0, dtype=torch.long)
        self._offset = 0
        self._cache = None
        self._batch = batch
        self._static = StaticStep(decoder, compile) if compile != "none" and batch is None else None
        # A seed: the decoder's context is `_seed` [K, S] followed by the frames from `_seed_at`
        # on, until `context` frames have been made after it; no rewind before `_floor`.
        self._seed: torch.Tensor | None = None
        self._seed_at = 0
        self._floor = 0
        # A batched stream always keeps its null row: the batch's shape never changes.
        self._guided = batch is not None or sampling.guidance_scale > 1.0
        start = prompt_frames if prompt_frames is not None else self._history
        self._history = start.to(torch.long).cpu().clone()
        if batch is not None:
            self._cache = batch.join(self)
        self._start_window()

    # -- public ----------------------------------------------------------------------------

    @property
    def complete(self) -> int:
        """Number of complete frames written since the stream began."""
        return self._offset + self._history.shape[1]

    def history(self) -> tuple[torch.Tensor, int]:
        """(tokens [K, T], offset): the kept complete frames; tokens[:, i] is frame offset + i."""
        return self._history, self._offset

    @torch.inference_mode()
    def generate_until(self, frame: int) -> None:
        """Run decoder steps until at least `frame` frames are complete."""
        while self.complete < frame:
            if self._batch is None:
                self._step()
            else:
                self._batch.step()

    @torch.inference_mode()
    def set_prompt(self, condition: TextCondition, from_frame: int) -> int:
        """Continue with a new text condition from `from_frame`; frames beyond it are dropped.

        Returns the frame from which the new condition is heard.
        """
        self._check_rewind(from_frame)
        self.generate_until(from_frame)
        self._truncate(from_frame)
        self.condition = condition
        self._start_window()
        return from_frame

    @torch.inference_mode()
    def seed(self, frames: torch.Tensor, condition: TextCondition | None, from_frame: int) -> int:
        """Continue from `from_frame` as if the frames before it were `frames` [K, S] (a clip's
        tokens), with `condition` (None: the current one). The frames already made before
        `from_frame` stay in `history()` (the codec decodes what was heard); only the decoder's
        context changes, as `generate(decoder_input_ids=frames)` would continue. Frames before
        `from_frame` can no longer be rewound to. Returns `from_frame`."""
        if frames.ndim != 2 or frames.shape[0] != self.num_codebooks or frames.shape[1] < 1:
            raise ValueError(
                f"seed frames must be [{self.num_codebooks}, T >= 1], got {list(frames.shape)}"
            )
        return self._continue_from(frames, condition, from_frame)

    @torch.inference_mode()
    def restart(
        self,
        from_frame: int,
        context_frames: int | None = None,
        condition: TextCondition | None = None,
    ) -> int:
        """Re-prefill from the stream's own frames: continue from `from_frame` (at most the frames
        made) with the last `context_frames` (default: the window's `context`; 0: none, the text
        alone) of what a window restart there would continue from, and `condition` (None: the
        current one). A seed of the stream's own recent tokens: the KV cache and the pending
        positions are rebuilt, the frames before `from_frame` stay. Returns `from_frame`."""
        keep = self.window.context if context_frames is None else context_frames
        if not 0 <= keep <= self.window.context:
            raise ValueError(f"context_frames must be in [0, {self.window.context}], got {keep}")
        if from_frame > self.complete:
            raise ValueError(f"from_frame {from_frame} is beyond the frames made ({self.complete})")
        self._check_rewind(from_frame)
        self._truncate(from_frame)
        context = self._context()  # [K, <= context]: fewer when older frames are gone
        recent = context[:, max(context.shape[1] - keep, 0) :]
        return self._continue_from(recent, condition, from_frame)

    def _continue_from(
        self, frames: torch.Tensor, condition: TextCondition | None, from_frame: int
    ) -> int:
        """`seed` and `restart`: frames [K, S >= 0] become the decoder's context at `from_frame`."""
        self._check_rewind(from_frame)
        self.generate_until(from_frame)
        self._truncate(from_frame)
        self._seed = frames.to(torch.long).cpu().clone()
        self._seed_at = self._floor = from_frame
        if condition is not None:
            self.condition = condition
        self._start_window()
        return from_frame

    @torch.inference_mode()
    def set_sampling(self, sampling: SamplingOptions, from_frame: int | None = None) -> None:
        """Change sampling settings. Turning guidance on or off changes the batch, which takes a
        continuation from `from_frame` (default: the last complete frame)."""
        sampling.validate()
        guided = sampling.guidance_scale > 1.0
        if sampling.seed != self.sampling.seed:
            self.generator = self._make_generator(sampling.seed)
        self.sampling = sampling
        if guided != self._guided:
            frame = self.complete if from_frame is None else from_frame
            self._check_rewind(frame)
            self._truncate(frame)
            self._guided = guided
            self._start_window()

    # -- windows ---------------------------------------------------------------------------

    def _make_generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.decoder.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def _check_rewind(self, frame: int) -> None:
        if frame < self._floor:
            raise ValueError(
                f"from_frame {frame} is too far back: the stream was seeded at frame {self._floor}"
            )
        if frame < max(self._offset, 0):
            raise ValueError(
                f"from_frame {frame} is too far back: frames before {self._offset} are no longer kept"
            )

    def _truncate(self, frame: int) -> None:
        self._history = self._history[:, : max(0, frame - self._offset)]

    def _context(self) -> torch.Tensor:
        """[K, <= context] the frames a new window continues from: the last `context` frames,
        or after a seed the seed's frames followed by those made since."""
        frames = self._history
        if self._seed is not None:
            made = frames[:, self._seed_at - self._offset :]
            if made.shape[1] >= self.window.context:
                self._seed = None  # the seed has left the context
            else:
                frames = torch.cat([self._seed, made], dim=1)
        return frames[:, -self.window.context :] if frames.shape[1] else frames

    def _start_window(self) -> None:
        """Re-prefill: positions restart at 0 with the last `context` frames as the prompt."""
        context = self._context()
        self._context_len = context.shape[1]
        rows = 2 if self._guided else 1
        positions = self.window.window
        if self._cache is None or self._cache.batch != rows:
            self._cache = self.decoder.new_cache(rows, positions)
        states, mask = batch_conditions([self.condition], guidance=self._guided)
        self._text = (states, mask)  # [rows, S, E], [rows, S]: what a batch pads and stacks
        self._cross: CrossKV = self.decoder.cross_kv(states, mask)
        if self._batch is not None:
            self._batch.text_changed()
        # Delayed layout of the whole window: known tokens (BOS/pad, context), -1 where unknown.
        layout = delayed_layout(context, self.delays, positions + 1)
        self._seq = layout.to(self.decoder.device)  # [K, W + 1]
        first = self._context_len + 1  # positions 0..C are known and prefilled together
        ids = self._seq[None, :, :first].expand(rows, -1, -1)
        began = time.perf_counter()
        logits = self.decoder.prefill(ids, self._cache, self._cross)
        if self._context_len == self.window.context:
            self.prefill_seconds = time.perf_counter() - began
        self._fed = first
        self.prefills += 1
        self._accept(logits)

    def _restart_if_full(self) -> bool:
        """At the end of a window, re-prefill (which also yields this step's tokens)."""
        if self._fed < self.window.window:
            return False
        log.debug(
            "window full at frame %d: re-prefilling %d frames", self.complete, self.window.context
        )
        self._start_window()
        return True

    def _next_ids(self) -> torch.Tensor:
        """[rows, K] the inputs of position `_fed` (the same for the conditional and null rows)."""
        return self._seq[None, :, self._fed].expand(self._cache.batch, -1)

    def _step(self) -> None:
        if self._restart_if_full():
            return
        ids = self._next_ids()
        if self._static is not None:
            at = torch.full((ids.shape[0],), self._fed, device=ids.device)
            tokens = self._static(
                ids, at, self._cache, self._cross, [self.sampling], [self.generator]
            )
            self._stepped(tokens=tokens[0])
            return
        logits = self.decoder.decode_one_step(
            ids, self._cache, self._cross, [self._fed] * ids.shape[0]
        )
        self._stepped(logits)

    def _stepped(
        self, logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> None:
        """Take the logits [rows, K, V] (or the static step's tokens [K]) of a decoder step over
        position `_fed`."""
        self._fed += 1
        self.steps += 1
        self._accept(logits, tokens)

    def _accept(self, logits: torch.Tensor | None, tokens: torch.Tensor | None = None) -> None:
        """Sample the tokens of position `_fed` from logits [B, K, V] (unless given, [K]), keep
        the forced ones (pads and known context), and move a newly complete frame into the
        history."""
        if tokens is None:
            tokens = sample_streams(
                logits, [self.sampling], [self.generator], self.decoder.kernels
            )[0]  # [K]
        position = self._fed
        known = self._seq[:, position]
        self._seq[:, position] = torch.where(known == -1, tokens, known)
        frame = position - 1 - self.max_delay  # window frame completed by this position
        if frame >= self._context_len:
            index = frame + 1 + self.delays.to(self._seq.device)  # [K] position of each codebook
            column = self._seq.gather(1, index[:, None]).cpu()  # [K, 1]
            assert bool((column != PAD).all()), "a complete frame holds a pad token"
            self._history = torch.cat([self._history, column], dim=1)
            if self._history.shape[1] > 2 * self.keep_frames:
                drop = self._history.shape[1] - self.keep_frames
                self._history = self._history[:, drop:].clone()
                self._offset += drop
