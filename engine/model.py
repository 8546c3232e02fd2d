"""The engine's public face: a loaded `MusicModel` that opens endless `AudioStream`s.

    model = MusicModel.load(LoadOptions(model="facebook/musicgen-small"))
    stream = model.open_stream("slow rainy-day jazz")
    pcm = stream.read(50)                      # [channels, 50 * 640] float32: one second
    stream.set_prompt("fast drum and bass", from_frame=stream.frame)
    stream.set_prompt(Blend.parse([{"text": "jazz", "weight": 0.7}, {"text": "rain"}]),
                      transition_seconds=8)   # a blend of texts, reached by a glide
    stream.seed(model.encode_clip(data).tokens, "jazz")  # go on from an uploaded clip
    stream.restart(context_frames=50)          # re-prefill from its own last second
    a, b = model.open_streams(["jazz", "rock"])  # stations sharing every decoder step
    pcm_a, pcm_b = read_together([a, b], 10)   # ... and one batched codec decode

A stream is used from one thread. Everything that knows torch lives behind this API.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from engine.batch import DecodeBatch
from engine.blend import Blend
from engine.clip import Clip, ClipLimits, encode_clip, one_thread
from engine.codec import StreamingDecoder, decode_together, prepare_codec
from engine.conditioning import TextCondition, batch_conditions, encode_prompt
from engine.decoder import Decoder
from engine.delay import codebook_delays, delayed_layout
from engine.lane import prefilled_since
from engine.linear import KernelModules
from engine.loading import LoadedModel, ModelLoadError, load_model
from engine.options import LoadOptions, SamplingOptions, WindowOptions
from engine.rows import Prompt
from engine.threads import ThreadUsage, barrier_regions
from engine.token_stream import TokenStream

log = logging.getLogger(__name__)

REWIND_FRAMES = 500  # how far back (10 s) a prompt change may rewind already generated audio


class MusicModel:
    def __init__(self, loaded: LoadedModel, modules: KernelModules | None = None) -> None:
        """`modules`: our C++ modules to run on in place of those the settings chose (another
        build of the same kernels: `bench/kernel_ab.py`); None: the settings'."""
        self.loaded = loaded
        self.musicgen = loaded.model  # the checkpoint's modules (`engine.musicgen`)
        prepare_codec(self.musicgen.audio_encoder)  # LSTM weights float16
        try:
            self.decoder = Decoder(self.musicgen.decoder, settings=loaded.settings, modules=modules)
        except ValueError as err:  # a setting this model cannot run
            raise ModelLoadError(str(err)) from None
        config = self.musicgen.config
        self.sample_rate: int = config.audio_encoder.sampling_rate
        self.channels: int = config.decoder.audio_channels
        self.num_codebooks: int = config.decoder.num_codebooks
        self.frame_rate: int = int(config.audio_encoder.frame_rate)
        self.hop: int = self.sample_rate // self.frame_rate
        self.max_positions: int = config.decoder.max_position_embeddings
        self.name = loaded.name
        self.compile = loaded.settings.compile  # the decoder step: "none", "compile" or "graphs"
        # the batches its streams step in, while any stream holds them (`use_cheap_cache`)
        self._batches: weakref.WeakSet[DecodeBatch] = weakref.WeakSet()
        self._unguided = False  # `drop_guidance`

    @classmethod
    def load(
        cls, options: LoadOptions | None = None, modules: KernelModules | None = None
    ) -> MusicModel:
        return cls(load_model(options or LoadOptions()), modules)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    @torch.inference_mode()
    def encode_prompt(self, text: str) -> TextCondition:
        decoder = self.decoder
        return encode_prompt(self.musicgen, text, decoder.text_bfloat16, decoder.encoder_products)

    @torch.inference_mode()
    def use_coarse(self, share: float) -> None:
        """int4 projections in place of the int8 ones in the last `share` of the decoder's
        layers (1: all, and the lm heads; 0: none), or back (`Decoder.use_coarse`): the radio's
        last resorts while generation cannot keep up. Call between reads, from the thread that
        reads; the first call quantizes (seconds)."""
        self.decoder.use_coarse(share)

    @torch.inference_mode()
    def prepare_coarse(self) -> Iterator[None]:
        """Quantize the int4 set for `use_coarse` a layer per step of the iterator
        (`Decoder.prepare_coarse`): a reader spreads the seconds between its reads."""
        yield from self.decoder.prepare_coarse()

    @property
    def coarse(self) -> float:
        """The share of the decoder's layers on int4 weights (`use_coarse`; 0: none)."""
        return self.decoder.coarse

    @property
    def coarse_ready(self) -> bool:
        return self.decoder.coarse_ready

    def coarse_available(self) -> str | None:
        """None when `use_coarse` can run with this model's settings, else why not."""
        return self.decoder.coarse_available()

    def read_per_step(self) -> tuple[float, float]:
        """(bytes, bytes per position per row) a decode step reads: the weights as set now (all
        of the cross-attention's: a folded prompt reads less, `Decoder.cross_read`) and the KV
        cache of one row per position it attends over (its kind now)."""
        return self.decoder.read_per_step()

    def expect_stations(self, count: int) -> None:
        """How many stations will share the decoder's steps (1 unless told): on our fused CPU
        step a prompt's cross-attention is folded into its text (read in place of q_cross's and
        out_cross's weights: ~10% fewer bytes a step for one musicgen-small station) only while
        that many such texts together read under two thirds of the weights' bytes
        (`Decoder.cross_kv`, `FOLD_SHARE`).
        Call before opening the streams."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.decoder.fold_stations = count

    @torch.inference_mode()
    def use_cheap_cache(self, on: bool) -> None:
        """An int4 KV cache in place of the int8 one (`on`), or back (`Decoder.use_cheap_cache`):
        the radio's first rung while generation cannot keep up. Every open
        stream's batch converts its cache now (`DecodeBatch.follow_cache_kind`: tens of
        milliseconds a station). Call between reads, from the thread that reads."""
        self.decoder.use_cheap_cache(on)
        for batch in list(self._batches):
            batch.follow_cache_kind()

    @torch.inference_mode()
    def drop_guidance(self, on: bool) -> None:
        """While `on`, every stream is sampled from its conditional rows alone: no null rows, so
        a step has half the rows (classifier-free guidance off: music that follows its prompt
        less closely; the radio's last rung when even every layer's int4 weights cannot keep
        up). Each open stream's batch drops them now (`DecodeBatch.drop_guidance`), and streams
        opened meanwhile start without them; off, each stream takes its null row back at its
        next window restart, built with its warm rows. Call between reads, from the thread
        that reads."""
        self._unguided = on
        for batch in list(self._batches):
            batch.drop_guidance(on)

    @property
    def unguided(self) -> bool:
        """Whether guidance is dropped (`drop_guidance`)."""
        return self._unguided

    @torch.inference_mode()
    def prepare_cheap_cache(self) -> Iterator[None]:
        """The int4 cache's buffers for `use_cheap_cache` in every open stream's batch, a layer
        of a buffer per step of the iterator (`DecodeBatch.prepare_kind`): a reader spreads the
        fresh memory's cost between its reads, ahead of need."""
        for batch in list(self._batches):
            yield from batch.prepare_kind("int4")

    @property
    def spares_missing(self) -> bool:
        """Whether an open stream's batch would lay its next rows out into fresh memory
        (`DecodeBatch.prepare_spare`)."""
        return any(batch.spare_missing for batch in list(self._batches))

    def prepare_spares(self) -> Iterator[None]:
        """The spare cache buffer of every open stream's batch that has none big enough, a
        layer of a buffer per step of the iterator (`DecodeBatch.prepare_spare`): a reader
        spreads the fresh memory's cost between its reads, ahead of the next window restart."""
        for batch in list(self._batches):
            yield from batch.prepare_spare()

    @property
    def cheap_cache(self) -> bool:
        return self.decoder.cheap_cache

    def cheap_cache_available(self) -> str | None:
        """None when `use_cheap_cache` can run with this model's settings, else why not."""
        return self.decoder.cheap_cache_available()

    def measure_prefill(
        self, window: WindowOptions | None = None, frames: int | None = None
    ) -> float:
        """Seconds one prefill of a whole context takes for a plain prompt (random tokens, both
        guidance rows): the pause a window restart or a prompt change puts in a stream before
        it goes on. A blend or a transition prefills one row per text and the null row
        (`engine.blend.prefill_rows`), about `Prefill.at_rows` of this. With `frames` (fewer than
        the context) it times a prefill of that many and scales it by context / frames: a
        prefill's cost grows with its frames (the projections of every row), and a radio
        starting up wants the figure without seconds of waiting."""
        window = (window or WindowOptions()).validate(self.max_positions)
        length = window.context if frames is None else max(1, min(frames, window.context))
        tokens = torch.randint(0, self.decoder.vocab, (self.num_codebooks, length))
        delays = codebook_delays(self.num_codebooks, self.channels)
        ids = delayed_layout(tokens, delays, length + 1).to(self.device)
        states, mask = batch_conditions([self.encode_prompt("calibration")], guidance=True)
        cross = self.decoder.cross_kv(states, mask, fold=False)  # (a prefill reads no fold)
        cache = self.decoder.new_cache(2, length + 8)
        began = time.perf_counter()
        self.decoder.prefill(ids[None].expand(2, -1, -1), cache, cross)
        self.decoder.wait()
        return (time.perf_counter() - began) * window.context / length

    def read_together(
        self,
        streams: list[AudioStream],
        frames: int,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[np.ndarray]:
        """`read_together(streams, frames, interrupt)` (below): the streams' next `frames`
        frames each, their codec decodes in one batched call. The radio's generator reads its
        stations so."""
        return read_together(streams, frames, interrupt)

    def new_codec(self, codec: str | None = None) -> StreamingDecoder:
        """A stream's codec decoder, its upsampling stack in `codec` ("float32" or "bfloat16")
        or, by default, as the settings chose (`Resolved.codec`)."""
        codec = codec or self.loaded.settings.codec
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[codec]
        return StreamingDecoder(
            self.musicgen.audio_encoder, audio_channels=self.channels, upsample_dtype=dtype
        )

    def encode_clip(
        self, data: bytes, limits: ClipLimits | None = None, *, single_thread: bool = False
    ) -> Clip:
        """The bytes of an uploaded audio file -> `Clip` whose tokens [K, T] seed a stream
        (`open_stream(..., prompt_frames=clip.tokens)`). `ClipError` for any bad upload.

        CPU work of seconds for a long clip (EnCodec's encoder): call it from a worker thread,
        never an event loop; `single_thread` runs it there without an OpenMP team of its own
        (`engine.clip.one_thread`), beside a generator thread. It reads the codec's weights
        only, so it may run while streams decode audio in another thread."""
        with one_thread() if single_thread else contextlib.nullcontext():
            return encode_clip(
                data,
                self.musicgen.audio_encoder,
                sample_rate=self.sample_rate,
                channels=self.channels,
                limits=limits,
            )

    @torch.inference_mode()
    def open_stream(
        self,
        prompt: str | Blend = "",
        sampling: SamplingOptions | None = None,
        window: WindowOptions | None = None,
        *,
        prompt_frames: torch.Tensor | None = None,
    ) -> AudioStream:
        """Start an endless stream of a text or a blend. `prompt_frames` [K, T] continues from
        given tokens."""
        return self._open(prompt, sampling, window, prompt_frames=prompt_frames)

    @torch.inference_mode()
    def open_streams(
        self,
        prompts: Sequence[str | Blend],
        samplings: list[SamplingOptions] | None = None,
        window: WindowOptions | None = None,
        *,
        prompt_frames: list[torch.Tensor | None] | None = None,
    ) -> list[AudioStream]:
        """Start several streams that share every decoder step (stations on one model).

        Reading any of them advances all of them, one position each per step; each keeps its
        own prompt (a text or a blend), sampling settings and windows. One prompt gives a plain
        single stream.
        `prompt_frames`: per stream, [K, T] tokens to continue from, or None.
        """
        samplings = samplings or [SamplingOptions()] * len(prompts)
        frames = prompt_frames or [None] * len(prompts)
        if not len(samplings) == len(frames) == len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts but {len(samplings)} sampling options and "
                f"{len(frames)} prompt frames"
            )
        if not prompts:
            return []
        if len(prompts) == 1:
            return [self._open(prompts[0], samplings[0], window, prompt_frames=frames[0])]
        window = (window or WindowOptions()).validate(self.max_positions)
        batch = DecodeBatch(self.decoder, window, len(prompts), self.compile)
        self._batches.add(batch)
        return [
            self._open(p, s, window, prompt_frames=f, batch=batch)
            for p, s, f in zip(prompts, samplings, frames, strict=True)
        ]

    def _open(
        self,
        prompt: str | Blend,
        sampling: SamplingOptions | None,
        window: WindowOptions | None,
        *,
        prompt_frames: torch.Tensor | None = None,
        batch: DecodeBatch | None = None,
    ) -> AudioStream:
        sampling = (sampling or SamplingOptions()).validate()
        window = (window or WindowOptions()).validate(self.max_positions)
        codec = self.new_codec()
        keep = window.context + codec.context + codec.lookahead + REWIND_FRAMES
        blend = as_blend(prompt)
        conditions: dict[str, TextCondition] = {}
        if batch is None:  # a lone stream: a batch of one
            batch = DecodeBatch(self.decoder, window, 1, self.compile)
            self._batches.add(batch)
        tokens = TokenStream(
            self.decoder,
            self.prompt_for(blend, conditions),
            sampling,
            window,
            audio_channels=self.channels,
            keep_frames=keep,
            prompt_frames=prompt_frames,
            batch=batch,
            compile=self.compile,
        )
        batch.drop_guidance(self._unguided)  # (a stream opened while guidance is dropped)
        return AudioStream(self, tokens, codec, blend, conditions)

    def prompt_for(self, blend: Blend, conditions: dict[str, TextCondition]) -> Prompt:
        """The decoder's prompt for `blend`: each text's condition from `conditions` (the same
        object for the same text keeps its decoder row), encoded and added there when new."""
        parts = []
        for text, weight in blend.parts:
            if weight == 0:  # (a glide's blend may hold texts at 0: they need no row)
                continue
            if text not in conditions:
                conditions[text] = self.encode_prompt(text)
            parts.append((conditions[text], weight))
        return Prompt.weighted(parts)


def as_blend(prompt: str | Blend) -> Blend:
    """A text is the blend of one (taken as it is: the engine encodes any string)."""
    if isinstance(prompt, Blend):
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt is a str or a Blend, got {type(prompt).__name__}")
    return Blend.of(prompt)


class AudioStream:
    """Endless PCM from a `TokenStream` through a streaming codec decoder."""

    def __init__(
        self,
        model: MusicModel,
        tokens: TokenStream,
        codec: StreamingDecoder,
        blend: Blend,
        conditions: dict[str, TextCondition],
    ):
        self.model = model
        self.tokens = tokens
        self.codec = codec
        self.blend = blend  # what it plays (a transition's target while it glides)
        self.prompt = blend.describe()  # the blend in words; a plain prompt's text
        self._conditions = conditions  # text -> its condition, for the texts its rows hold
        self.frame = 0  # frames of audio returned by read()
        self.generate_seconds = 0.0  # wall time spent in decoder steps (statistics)
        self.decode_seconds = 0.0  # wall time spent in codec decoding (statistics)

    @property
    def sampling(self) -> SamplingOptions:
        return self.tokens.sampling

    @torch.inference_mode()
    def read(self, frames: int, interrupt: Callable[[], bool] | None = None) -> np.ndarray:
        """The next `frames` frames of audio: float32 [channels, frames * hop]. `interrupt`,
        asked before each decoder step, may stop the read (`Interrupted`): nothing is read
        then, and the frames made so far serve the next read."""
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        start, stop = self.frame, self.frame + frames
        began = time.perf_counter()
        self.tokens.generate_until(stop + self.codec.lookahead, interrupt)
        decoded = time.perf_counter()
        codes, offset = self.tokens.history()
        with barrier_regions():
            pcm = self.codec.decode(codes, offset, start, stop)
        self.generate_seconds += decoded - began
        self.decode_seconds += time.perf_counter() - decoded
        self.frame = stop
        return pcm

    @torch.inference_mode()
    def set_prompt(
        self,
        prompt: str | Blend,
        from_frame: int | None = None,
        transition_seconds: float = 0.0,
    ) -> int:
        """Hear `prompt` (a text or a `Blend`) from `from_frame` on (default: the next frame
        read). A frame before `self.frame` rewinds: read() then continues from the returned
        frame. With `transition_seconds` > 0 the blend heard before glides into it over that
        long (both blends' rows are prefilled now; 0: a switch)."""
        frame = self._check_frame(from_frame)
        if not (math.isfinite(transition_seconds) and transition_seconds >= 0):
            raise ValueError(f"transition_seconds must be >= 0, got {transition_seconds}")
        blend = as_blend(prompt)
        glide = round(transition_seconds * self.model.frame_rate)
        began = ThreadUsage.now()
        decoder_prompt = self._decoder_prompt(blend)
        encoded = time.perf_counter()
        before, cross = self.tokens.last_prefill, self.model.decoder.cross_seconds
        heard = self.tokens.set_prompt(decoder_prompt, frame, glide)
        if log.isEnabledFor(logging.DEBUG):
            spent = ThreadUsage.now().since(began)
            prefilled = prefilled_since(self.tokens.last_prefill, before)
            cross = self.model.decoder.cross_seconds - cross
            log.debug(
                "a prompt change took %.3f s: its texts' encoding %.3f s, its prefill %.3f s, "
                "the cross-attention %.3f s, the rest %.3f s (%s)",
                spent.wall,
                encoded - began.wall,
                prefilled,
                cross,
                spent.wall - (encoded - began.wall) - prefilled - cross,
                spent.describe(),
            )
        self._played(blend)
        self.frame = min(self.frame, heard)
        return heard

    @torch.inference_mode()
    def seed(
        self,
        tokens: torch.Tensor,
        prompt: str | Blend | None = None,
        from_frame: int | None = None,
    ) -> int:
        """Continue from `from_frame` (default: the next frame read) as if the music before it
        were `tokens` [K, T] (`MusicModel.encode_clip(...).tokens`), with `prompt`, a text or a
        blend (None: the current one): audiocraft's `generate_continuation` in a running stream. What was heard
        stays heard; frames before the returned one can no longer be rewound to."""
        frame = self._check_frame(from_frame)
        blend = None if prompt is None else as_blend(prompt)
        decoder_prompt = None if blend is None else self._decoder_prompt(blend)
        heard = self.tokens.seed(tokens, decoder_prompt, frame)
        if blend is not None:
            self._played(blend)
        self.frame = min(self.frame, heard)
        return heard

    def _check_frame(self, from_frame: int | None) -> int:
        """The frame a change starts at (default: the next frame read), within rewind reach."""
        frame = self.frame if from_frame is None else from_frame
        if frame < self.frame - REWIND_FRAMES:
            raise ValueError(
                f"from_frame {frame} is more than {REWIND_FRAMES} frames before the stream "
                f"position {self.frame}"
            )
        return frame

    def _decoder_prompt(self, blend: Blend) -> Prompt:
        return self.model.prompt_for(blend, self._conditions)

    def _played(self, blend: Blend) -> None:
        """`blend` plays now: keep the conditions the stream's rows still hold, no others."""
        self.blend, self.prompt = blend, blend.describe()
        held = self.tokens.conditions_in_use()
        self._conditions = {t: c for t, c in self._conditions.items() if any(c is h for h in held)}

    @torch.inference_mode()
    def restart(
        self,
        from_frame: int | None = None,
        *,
        context_frames: int | None = None,
        prompt: str | Blend | None = None,
    ) -> int:
        """Re-prefill from the stream's own recent tokens and go on from `from_frame` (default:
        the next frame read): the last `context_frames` frames before it are the decoder's
        context (default: a window's `context`, what a window restart takes; 0: none, a fresh
        start from the prompt alone), with `prompt` (None: the current one). A `seed` of the
        stream's own frames: after a step that raised, the KV cache and pending positions are
        rebuilt from what was made; a short context leaves a stuck passage (the radio's music
        watchdog). Frames before the returned one can no longer be rewound to.

        A stream of a batch goes on generating while it is not read; when the frames before
        `from_frame` are no longer kept, it goes on from the earliest frame it still can decode
        (later than asked). Returns the frame the new audio begins at."""
        frame = self._check_frame(from_frame)
        offset = self.tokens.history()[1]
        if offset > 0:
            frame = max(frame, offset + self.codec.context)
        blend = None if prompt is None else as_blend(prompt)
        decoder_prompt = None if blend is None else self._decoder_prompt(blend)
        heard = self.tokens.restart(frame, context_frames, decoder_prompt)
        if blend is not None:
            self._played(blend)
        self.frame = heard
        return heard

    def shorten_restarts(self, frames: int | None) -> None:
        """Window restarts from the next on re-read at most `frames` of music (None: the whole
        context again): less prefill per window when the machine cannot keep up."""
        self.tokens.shorten_restarts(frames)

    def shorten_windows(self, frames: int | None) -> None:
        """Windows from the next on span at most `frames` positions (None: the whole window
        again): cheaper steps, a shorter memory, when the machine cannot keep up."""
        self.tokens.shorten_windows(frames)

    def token_frames(self, start: int, stop: int) -> np.ndarray:
        """The stream's frames [start, stop) as int64 [K, stop - start] (a copy), for example
        the ones `read` just decoded; ValueError when they are not (or no longer) kept."""
        codes, offset = self.tokens.history()
        if not offset <= start <= stop <= offset + codes.shape[1]:
            raise ValueError(
                f"frames [{start}, {stop}) are not kept (kept: [{offset}, "
                f"{offset + codes.shape[1]}))"
            )
        return codes[:, start - offset : stop - offset].numpy().copy()

    @torch.inference_mode()
    def set_sampling(self, sampling: SamplingOptions) -> None:
        self.tokens.set_sampling(sampling, from_frame=max(self.frame, 0))


@torch.inference_mode()
def read_together(
    streams: list[AudioStream], frames: int, interrupt: Callable[[], bool] | None = None
) -> list[np.ndarray]:
    """The next `frames` frames of audio of each stream, as `read` gives them, with the codec
    decodes of all of them batched into one (`engine.codec.decode_together`: the codec's weights
    read once for all streams). Streams of one `open_streams` batch generate together anyway.
    `interrupt` as for `read`: an interrupted call reads nothing for any stream."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not streams:
        return []
    began = time.perf_counter()
    for stream in streams:
        stream.tokens.generate_until(stream.frame + frames + stream.codec.lookahead, interrupt)
    decoded = time.perf_counter()
    calls = [(s.codec, *s.tokens.history(), s.frame, s.frame + frames) for s in streams]
    with barrier_regions():
        pcms = decode_together(calls)
    decode_share = (time.perf_counter() - decoded) / len(streams)
    for stream in streams:
        stream.generate_seconds += (decoded - began) / len(streams)
        stream.decode_seconds += decode_share
        stream.frame += frames
    return pcms
