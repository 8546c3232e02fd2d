"""Streaming EnCodec decode: MusicGen tokens -> 32 kHz PCM, chunk by chunk, equal to the one-shot
decode of the same tokens.

- `streaming`: `StreamingDecoder`, a stream's state (LSTM state ring, lookahead carried to the
  next call, emitted audio, crossfaded joins);
- `lstm`: the LSTM run frame by frame, its recurrent weights rounded to float16
  (`round_lstm_weights`) and read by the C++ kernel `lstm_f16.h` (`native` builds it);
- `upsampler`: the upsampling stack, time-major, cropped to what a call's audio needs;
- `layers`: EnCodec's layers in the forms streaming needs (time-major, unpadded; our ELU),
  `freeze_weight_norm`;
- `batched`: `decode_together`, several streams' calls with their LSTMs and upsampling stacks
  batched (stations on one model);
- `one_shot`: `decode_full`, the reference decode of all frames at once;
- `native`: builds our C++ kernels (`codec_kernels.cpp`: the float16 LSTM, the ELU; AVX2).

`prepare_codec` readies a loaded model's codec for streaming, once. docs/codec.md says how the
streaming decode works and what it costs.
"""

from torch import nn

from engine.codec.batched import decode_together
from engine.codec.layers import freeze_weight_norm
from engine.codec.lstm import round_lstm_weights
from engine.codec.one_shot import decode_full
from engine.codec.streaming import HOP, StreamingDecoder


def prepare_codec(audio_encoder: nn.Module, *, lstm_float16: bool = True) -> None:
    """Freeze the weight norm of `audio_encoder`'s convs and, with `lstm_float16`, round its
    LSTM's recurrent weights to float16 values, in place (see `engine.codec.lstm`)."""
    freeze_weight_norm(audio_encoder)
    if lstm_float16:
        round_lstm_weights(audio_encoder)


__all__ = [
    "HOP",
    "StreamingDecoder",
    "decode_full",
    "decode_together",
    "freeze_weight_norm",
    "prepare_codec",
    "round_lstm_weights",
]
