"""Options for loading and running the engine: frozen dataclasses, one comment per field.

They are built once (from `config.toml` or CLI flags) and checked by `validate()`, which raises
`ValueError` naming the bad field, so a bad setting stops start-up with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("auto", "none", "int8", "int4", "int4-ffn")
KV_CACHES = ("auto", "float32", "bfloat16", "int8", "int4")
COMPILE = ("auto", "none", "compile", "graphs")
CODECS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class LoadOptions:
    model: str = "facebook/musicgen-small"  # hub id or local folder
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 on CUDA / CPUs with AVX-512 BF16 or AMX), or a dtype name
    # the decoder's projections: "auto" (int8 on CPU, none on GPU), "none", "int8", "int4" (our
    # int4 kernel: half int8's bytes per step), or "int4-ffn" (int4 fc1/fc2, int8 for the rest);
    # the quantized modes are CPU only
    quantize: str = "auto"
    # the decoder step: "auto" (graphs on CUDA, none on CPU), "none" (eager), "compile"
    # (torch.compile, no graphs) or "graphs" (torch.compile with CUDA graphs; CUDA only)
    compile: str = "auto"
    # the self-attention KV cache: "auto" (int8 for an int8 decoder and bfloat16 for a bfloat16
    # one where our CPU kernels run, else the attention dtype), "float32", "bfloat16", "int8",
    # or "int4" (our CPU kernels, heads of 64: half int8's bytes, for stations batched together)
    kv_cache: str = "auto"
    # the streaming codec's upsampling stack (EnCodec's convs, 40-60% of its time): "auto"
    # (bfloat16 on a CPU with AMX, else float32; the model's dtype on a GPU), "float32" (equal to
    # the one-shot decode up to float rounding), "bfloat16" (44.6 dB from it: docs/codec.md)
    codec: str = "auto"

    def validate(self) -> LoadOptions:
        if not self.model:
            raise ValueError("model: must name a hub id or a local folder")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device: must be one of {DEVICES} or 'cuda:N', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize: must be one of {QUANTIZE}, got {self.quantize!r}")
        quantized = self.quantize not in ("auto", "none")
        if quantized and self.dtype not in ("auto", "float32"):
            raise ValueError(
                f"quantize: {self.quantize} runs its activations in float32; set dtype to auto or "
                f"float32, not {self.dtype!r}"
            )
        if quantized and self.device.startswith("cuda"):
            raise ValueError(
                f"quantize: {self.quantize} is a CPU mode; on a GPU use dtype bfloat16 or float16"
            )
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache: must be one of {KV_CACHES}, got {self.kv_cache!r}")
        quantized_cache = self.kv_cache in ("int8", "int4")
        if quantized_cache and self.device.startswith("cuda"):
            raise ValueError(
                f"kv_cache: {self.kv_cache} is a CPU mode (our CPU kernels); on a GPU use auto"
            )
        if quantized_cache and self.compile in ("compile", "graphs"):
            raise ValueError(
                "kv_cache: the compiled step reads a float cache; use auto or bfloat16"
            )
        if self.codec not in CODECS:
            raise ValueError(f"codec: must be one of {CODECS}, got {self.codec!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"compile: must be one of {COMPILE}, got {self.compile!r}")
        if self.compile == "graphs" and self.device == "cpu":
            raise ValueError("compile: graphs need a CUDA device; on a CPU use compile or none")
        return self


# The documented range of each sampling setting, shared by config.toml and the admin API:
# (low, high), both included. Beyond them the music is noise or silence, or the maths overflows
# (a temperature of 1e-320 divides the logits into infinities).
GUIDANCE_RANGE = (1.0, 20.0)
TEMPERATURE_RANGE = (0.05, 5.0)
TOP_K_RANGE = (0, 2048)  # 0 keeps all; MusicGen's codebooks have 2048 entries
TOP_P_RANGE = (0.0, 1.0)
SEED_RANGE = (0, 2**63 - 1)


@dataclass(frozen=True)
class SamplingOptions:
    guidance_scale: float = 3.0  # classifier-free guidance, in [1, 20]; 1.0 turns it off
    temperature: float = 1.0  # softmax temperature, in [0.05, 5]
    top_k: int = 250  # keep the k most likely tokens, in [0, 2048]; 0 keeps all
    top_p: float = 0.0  # nucleus sampling, in [0, 1]; 0 turns it off
    greedy: bool = False  # argmax instead of sampling (tests and reproducible renders)
    seed: int | None = None  # seed of the sampler's random generator; None draws one

    def validate(self) -> SamplingOptions:
        """self; ValueError naming the field when a value is outside its range (NaN included)."""
        _check_range("guidance_scale", self.guidance_scale, GUIDANCE_RANGE)
        _check_range("temperature", self.temperature, TEMPERATURE_RANGE)
        _check_range("top_k", self.top_k, TOP_K_RANGE)
        _check_range("top_p", self.top_p, TOP_P_RANGE)
        if self.seed is not None:
            _check_range("seed", self.seed, SEED_RANGE)
        return self


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not low <= value <= high:  # also false for NaN
        raise ValueError(f"{name}: must be in [{low}, {high}], got {value}")


# frames a window makes beyond its context, however short it is (a second of new music)
MIN_NEW_FRAMES = 50


@dataclass(frozen=True)
class WindowOptions:
    window: int = (
        1500  # frames in one KV-cache window (50 frames = 1 s); at most the model's positions
    )
    context: int = (
        500  # frames re-prefilled as the prompt when a window is full or the prompt changes
    )
    # frames re-prefilled when the prompt changes (at most `context`; 0 = `context`): a shorter
    # re-read is heard sooner (its prefill is the wait on a CPU), and 0.5 s keep the music's
    # pulse and sound across the change; the next window restart re-reads the whole context
    prompt_context: int = 25
    # build the next window a step at a time in the last `context` steps of this one (its rows
    # beside the stream's in the same decoder steps), so a window restart prefills nothing:
    # the radio does not stall for a prefill every `window - context` frames
    warm_restarts: bool = True

    def validate(self, max_positions: int = 2048) -> WindowOptions:
        if self.context < 1:
            raise ValueError(f"context: must be >= 1 frame, got {self.context}")
        if self.prompt_context < 0:
            raise ValueError(
                f"prompt_context: must be >= 0 frames (0 = context), got {self.prompt_context}"
            )
        if self.window > max_positions - 16:
            raise ValueError(
                f"window: must be at most {max_positions - 16} frames for this model "
                f"(its position table has {max_positions}), got {self.window}"
            )
        if self.window < self.context + MIN_NEW_FRAMES:
            raise ValueError(
                f"window: must exceed context by at least {MIN_NEW_FRAMES} frames, got "
                f"window={self.window}, "
                f"context={self.context}"
            )
        return self

    @property
    def change_context(self) -> int:
        """Frames a prompt change re-prefills."""
        return min(self.prompt_context, self.context) if self.prompt_context else self.context
