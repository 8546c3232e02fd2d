"""Streaming EnCodec decode (`engine.codec`): streamed audio equals the one-shot decode of the
same tokens and weights (LSTM weights rounded to float16 as the engine runs them, or float32),
has exactly frames x 640 samples, costs a bounded amount per call, survives rewinds, and refuses
calls that lack context or lookahead; the float16 LSTM kernel equals the float32 recurrence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EncodecConfig, EncodecModel, MusicgenForConditionalGeneration
from transformers.models.encodec.modeling_encodec import (
    EncodecConv1d,
    EncodecConvTranspose1d,
    EncodecResnetBlock,
)

from engine.codec import (
    HOP,
    StreamingDecoder,
    decode_full,
    decode_together,
    native,
    prepare_codec,
)
from engine.codec.layers import (
    TimeMajorConv1d,
    TimeMajorConvTranspose1d,
    TimeMajorOutputConv1d,
    TimeMajorResnetBlock,
    elu,
)
from engine.codec.lstm import FrameLSTM, round_lstm_weights
from engine.codec.upsampler import CroppedUpsampler
from tests.helpers import snr_db

EXACT_DB = 90.0  # the decode is exact up to float rounding (measured ~138 dB); issue 2 asks 40
APPROX_DB = 40.0  # a fresh start away from frame 0 warms the LSTM up: approximate


def _audio_encoder(model_dir: str, *, lstm_float16: bool = True):
    """The checkpoint's EnCodec with random codebooks, prepared as the engine prepares it
    (`lstm_float16`: LSTM weights rounded to float16). Random-init codebooks are all zeros,
    which would make the audio independent of the tokens and these tests vacuous. With std 30
    the tokens, not the biases, make most of the signal (see `test_audio_depends_on_tokens`)."""
    codec = MusicgenForConditionalGeneration.from_pretrained(model_dir).audio_encoder.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            embed = layer.codebook.embed
            embed.copy_(30 * torch.randn(embed.shape, generator=gen))
    prepare_codec(codec, lstm_float16=lstm_float16)
    return codec


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core box two spinning OpenMP
    threads made this file 6x slower (84 s against 13 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mono(tiny_model_dir):
    return _audio_encoder(tiny_model_dir)


@pytest.fixture(scope="module")
def stereo(tiny_stereo_dir):
    return _audio_encoder(tiny_stereo_dir)


@pytest.fixture(scope="module")
def mono32(tiny_model_dir):
    return _audio_encoder(tiny_model_dir, lstm_float16=False)


@pytest.fixture(scope="module")
def stereo32(tiny_stereo_dir):
    return _audio_encoder(tiny_stereo_dir, lstm_float16=False)


def _kernel_expected() -> bool:
    """Whether the float16 LSTM kernel must run here (it needs AVX2, FMA and F16C)."""
    return native.unavailable_reason() is None


def _codes(channels: int, frames: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (4 * channels, frames), generator=gen)  # [K, T]


def _stream(dec: StreamingDecoder, codes: torch.Tensor, bounds: list[int]) -> np.ndarray:
    """Decode frames [bounds[0], bounds[-1]) in calls [bounds[i], bounds[i+1]), each given only
    the codes it is entitled to: `context` frames before start, `lookahead` after stop."""
    pieces = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        offset = max(0, start - dec.context)
        piece = dec.decode(codes[:, offset : stop + dec.lookahead], offset, start, stop)
        assert piece.dtype == np.float32 and piece.shape == (dec.channels, (stop - start) * HOP)
        pieces.append(piece)
    return np.concatenate(pieces, axis=1)


def test_audio_depends_on_tokens(mono):
    a = decode_full(mono, _codes(1, 20, seed=1), 1)
    b = decode_full(mono, _codes(1, 20, seed=2), 1)
    assert a.shape == (1, 20 * HOP)
    assert snr_db(a, b) < 6, "the codec ignores its tokens: the SNR tests would prove nothing"


@pytest.mark.parametrize("lstm", ["float16", "float32"])
@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
@pytest.mark.parametrize(
    "chunks",
    [[10] * 24, [25] * 10, [50] * 5, [1, 7, 30, 3, 50, 13, 2, 64, 40, 9, 21]],
    ids=["10", "25", "50", "irregular"],
)
def test_streamed_equals_one_shot(request, lstm, channels, chunks):
    name = ("mono" if channels == 1 else "stereo") + ("32" if lstm == "float32" else "")
    codec = request.getfixturevalue(name)
    frames = sum(chunks)
    dec = StreamingDecoder(codec, audio_channels=channels)
    assert dec.lstm_float16 == (lstm == "float16" and _kernel_expected())
    codes = _codes(channels, frames + dec.lookahead, seed=channels)
    streamed = _stream(dec, codes, [0, *np.cumsum(chunks).tolist()])
    assert streamed.shape == (channels, frames * HOP)
    reference = decode_full(codec, codes, channels)[:, : frames * HOP]
    assert snr_db(reference, streamed) >= EXACT_DB
    for c in range(channels):  # every channel on its own, not only on average
        assert snr_db(reference[c], streamed[c]) >= EXACT_DB


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "frames", "batch"),
    [(1024, 512, 16, 8, 13, 1), (64, 32, 16, 8, 1, 2), (16, 8, 10, 5, 7, 1), (6, 3, 7, 3, 5, 2)],
    ids=["musicgen-first", "one-frame-stereo", "k10-s5", "k7-s3"],
)
def test_conv_transpose_matmul_equals_module(cin, cout, kernel, stride, frames, batch):
    """The time-major matmul + overlap-add form of EnCodec's transposed conv gives the module's
    output: same length, same samples up to float rounding, also when k is not a multiple of s."""
    gen = torch.Generator().manual_seed(kernel)
    module = EncodecConvTranspose1d(EncodecConfig(use_causal_conv=False), cin, cout, kernel, stride)
    with torch.no_grad():
        module.conv.bias.copy_(torch.randn(cout, generator=gen))
        x = torch.randn(batch, cin, frames, generator=gen)
        reference = module(x)  # [B, Cout, L]
        ours = TimeMajorConvTranspose1d(module)(x.transpose(1, 2).contiguous())  # [B, L, Cout]
    assert ours.shape == reference.transpose(1, 2).shape
    assert snr_db(reference.numpy(), ours.transpose(1, 2).numpy()) >= 120
    torch.testing.assert_close(
        ours.transpose(1, 2), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max())
    )


def _encodec_config(pad_mode: str = "reflect") -> EncodecConfig:
    return EncodecConfig(use_causal_conv=False, pad_mode=pad_mode)


def _conv(cin: int, cout: int, kernel: int, dilation: int = 1, pad_mode: str = "reflect"):
    return EncodecConv1d(_encodec_config(pad_mode), cin, cout, kernel, dilation=dilation)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _conv(64, 1, 7),  # the audio output conv
        lambda: _conv(4, 1, 7),
        lambda: _conv(8, 2, 3, dilation=2),
        lambda: _conv(32, 16, 3, pad_mode="constant"),
        lambda: EncodecResnetBlock(_encodec_config(), 32, [1, 1]),
        lambda: EncodecResnetBlock(_encodec_config(), 16, [2, 1]),
    ],
    ids=["output", "output-narrow", "dilated", "zero-pad", "resnet-block", "resnet-dilated"],
)
def test_time_major_layers_equal_module(make):
    """EnCodec's same-rate layers run time-major without padding give the module's output where
    the module's padding plays no part, and with `at_start` its output from sample 0 on (its
    padding of the left edge, reflect or zeros, done the same way)."""
    gen = torch.Generator().manual_seed(0)
    module = make()
    with torch.no_grad():
        for conv in [m for m in module.modules() if isinstance(m, nn.Conv1d)]:
            conv.bias.copy_(torch.randn(conv.out_channels, generator=gen))
        cin = next(m for m in module.modules() if isinstance(m, nn.Conv1d)).in_channels
        x = torch.randn(2, cin, 300, generator=gen)
        reference = module(x).transpose(1, 2)  # [B, L, Cout]
        is_output = isinstance(module, EncodecConv1d) and module.conv.out_channels <= 2
        ours = (TimeMajorOutputConv1d if is_output else _time_major_layer)(module)
        valid = ours(x.transpose(1, 2).contiguous())
        at_start = ours(x.transpose(1, 2).contiguous(), at_start=True)
    left, right = ours.left, ours.right
    assert left + right > 0
    tol = {"rtol": 1e-5, "atol": 1e-5 * float(reference.abs().max())}
    torch.testing.assert_close(valid, reference[:, left : 300 - right], **tol)
    torch.testing.assert_close(at_start, reference[:, : 300 - right], **tol)


def _time_major_layer(module):
    if isinstance(module, EncodecResnetBlock):
        return TimeMajorResnetBlock(module)
    return TimeMajorConv1d(module)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 13, 40_001])
def test_our_elu_equals_pytorchs(dtype, n):
    """codec_kernels' ELU (alpha 1), float32 and bfloat16 (a bfloat16 stack's): within a few
    float32 ulps of the exact function, and in bfloat16 that value rounded to nearest even, over
    large negatives, values near 0 where expm1 must not cancel, and lengths off the vector's 8."""
    kernels = native.get()
    if kernels is None:
        assert not _kernel_expected(), "our codec kernels should have built here"
        pytest.skip(f"our codec kernels do not run here: {native.unavailable_reason()}")
    gen = torch.Generator().manual_seed(n)
    x = torch.cat([torch.tensor([-80.0, -1e-4, 0.0, 3e-5]), 4 * torch.randn(n, generator=gen)])
    x = x[:n].to(dtype)
    ours = kernels.elu(x)
    assert ours.dtype == dtype and ours.shape == x.shape
    exact = F.elu(x.double())
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double(), exact, rtol=4e-7, atol=1e-30)
    else:  # our float32 result rounded once: at most one bfloat16 step from the exact one
        torch.testing.assert_close(ours.double(), exact, rtol=2**-8, atol=1e-30)
        assert torch.equal(ours, kernels.elu(x.float()).bfloat16())


def test_a_gpu_codecs_elu_never_builds_our_cpu_kernels(monkeypatch):
    """A tensor off the CPU (a GPU's codec; here the meta device) takes PyTorch's ELU without
    asking for our CPU kernels, which would build them (and log a misleading fallback) on a
    machine where they serve nothing."""

    def refuse():
        raise AssertionError("our CPU kernels were asked for")

    monkeypatch.setattr(native, "get", refuse)
    x = torch.empty(3, 8, device="meta")
    assert elu(x).device.type == "meta"
    assert elu(torch.ones(4, dtype=torch.float64)).dtype == torch.float64  # (nor for float64)


BFLOAT16_DB = 35.0  # the bfloat16 stack against the float32 decode: ~41 dB tiny, 44.6 dB small


@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
def test_a_bfloat16_upsampling_stack_stays_near_the_float32_decode(request, channels):
    """`upsample_dtype=torch.bfloat16` (model.codec on a CPU with fast bfloat16 maths): the
    upsampling convs' weights and activations in bfloat16, the audio float32, the same length
    and joins, within BFLOAT16_DB of the exact decode on every channel, and not the float32
    decode itself (the dtype is used: an option that changed nothing would pass otherwise)."""
    codec = request.getfixturevalue("mono" if channels == 1 else "stereo")
    dec = StreamingDecoder(codec, audio_channels=channels, upsample_dtype=torch.bfloat16)
    exact = StreamingDecoder(codec, audio_channels=channels)
    assert dec.upsample_dtype == torch.bfloat16 and exact.upsample_dtype is None
    chunks = [10, 25, 3, 50, 12]
    codes = _codes(channels, sum(chunks) + dec.lookahead, seed=5 + channels)
    bounds = [0, *np.cumsum(chunks).tolist()]
    ours = _stream(dec, codes, bounds)
    reference = decode_full(codec, codes, channels)[:, : sum(chunks) * HOP]
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    for c in range(channels):
        assert BFLOAT16_DB <= snr_db(reference[c], ours[c]) < EXACT_DB
    assert snr_db(reference, _stream(exact, codes, bounds)) >= EXACT_DB


def test_streams_upsampling_in_different_dtypes_are_not_decoded_together(mono):
    a = StreamingDecoder(mono, audio_channels=1)
    b = StreamingDecoder(mono, audio_channels=1, upsample_dtype=torch.bfloat16)
    codes = _codes(1, 20)
    with pytest.raises(ValueError, match="same dtype"):
        decode_together([(a, codes, 0, 0, 10), (b, codes, 0, 0, 10)])
    c = StreamingDecoder(mono, audio_channels=1, upsample_dtype=torch.bfloat16)
    other = _codes(1, 20, seed=9)
    outs = decode_together([(b, codes, 0, 0, 10), (c, other, 0, 0, 10)])
    for out, tokens in zip(outs, (codes, other), strict=True):  # each what it gives alone
        alone = StreamingDecoder(mono, audio_channels=1, upsample_dtype=torch.bfloat16)
        assert snr_db(alone.decode(tokens, 0, 0, 10), out) >= BFLOAT16_DB


@pytest.mark.parametrize("frames", [3, 4, 13, 28])
def test_cropped_upsampling_equals_the_whole_stack(mono, frames):
    """The upsampling stack run only over the receptive field of the wanted samples gives what
    the whole stack gives for them: away from frame 0 (one frame of margin each side) and at
    frame 0, where nothing is cropped on the left."""
    layers = list(mono.decoder.layers[2:])
    gen = torch.Generator().manual_seed(frames)
    y = torch.randn(1, layers[1].conv.in_channels, frames, generator=gen)
    with torch.no_grad():
        whole = y
        for layer in layers:
            whole = layer(whole)
        up = CroppedUpsampler(layers)
        for lo, hi, at_zero in [
            (HOP, (frames - 1) * HOP, False),  # a call's audio + crossfade tail
            (HOP, HOP + 7, False),
            (0, (frames - 2) * HOP, True),  # the first call of a stream
            (0, (frames - 1) * HOP - 1, True),
        ]:
            ours = up(y.transpose(1, 2), lo, hi, at_zero=at_zero)  # [1, hi - lo, 1]
            assert ours.shape == (1, hi - lo, 1)
            ref = whole[..., lo:hi]
            assert snr_db(ref.numpy(), ours.transpose(1, 2).numpy()) >= 120, (lo, hi)


def test_work_per_call_is_bounded(mono):
    """A long stream: every call runs the convs on the same small number of frames, however
    long the stream already is (the history is never re-decoded)."""
    dec = StreamingDecoder(mono, audio_channels=1)
    conv_frames: list[int] = []
    upsample_frames: list[int] = []
    conv0, upsample = dec._conv0, dec._upsample

    def first_conv(x, *, at_start):  # x [B, n, D]: the frames the first conv reads
        conv_frames.append(x.shape[1])
        return conv0(x, at_start=at_start)

    def counted(y, lo, hi, *, at_zero):  # y [B, n, D]: the frames it reads of those it is given
        a, b = upsample.plan(y.shape[1], lo, hi)[0]
        upsample_frames.append(b - max(a, 0))
        return upsample(y, lo, hi, at_zero=at_zero)

    dec._conv0, dec._upsample = first_conv, counted
    chunk, calls = 10, 150  # 30 s of audio
    codes = _codes(1, chunk * calls + dec.lookahead, seed=3)
    for i in range(calls):  # the caller hands over everything it has, as the engine does
        start = i * chunk
        dec.decode(codes[:, : start + chunk + dec.lookahead], 0, start, start + chunk)
    assert len(conv_frames) == len(upsample_frames) == calls
    # The LSTM runs the chunk's frames once: a continuation goes on from the state the previous
    # call reached in its lookahead, so the first conv sees the new frames + 3 each side.
    assert set(conv_frames[1:]) == {chunk + 6}, conv_frames
    # The upsampling stack reads the chunk's frames and 2 ahead (the crossfade tail, a margin);
    # the first frame's audio is the previous call's tail, so no margin frame before is read.
    assert set(upsample_frames[1:]) == {chunk + 2}, upsample_frames
    assert max(conv_frames) <= chunk + dec.context + dec.lookahead


@pytest.mark.parametrize("at", [70, 100], ids=["rewind-30", "at-stream-frame"])
def test_prompt_change_decodes_the_new_tokens(mono, at):
    """A prompt change at frame `at` (30 frames back, or right where the stream is): tokens
    before `at` stay, tokens from `at` on change, including the lookahead the decoder saw.
    The audio from `at` on is the one-shot decode of the new tokens, after a crossfade that
    starts from the audio decoded before for the same instant."""
    dec = StreamingDecoder(mono, audio_channels=1)
    old = _codes(1, 200, seed=4)
    new = torch.cat([old[:, :at], _codes(1, 200 - at, seed=5)], dim=1)
    _stream(dec, old, [0, 25, 50, 75, 100])
    after = _stream(dec, new, [at, at + 25, at + 50])
    ref = decode_full(mono, new, 1)[:, at * HOP : (at + 50) * HOP]
    xf = dec.crossfade
    assert snr_db(ref[:, xf:], after[:, xf:]) >= EXACT_DB
    assert snr_db(ref[:, :xf], after[:, :xf]) < 40  # the fade region is not the new audio yet
    # ... but the old one: the join starts from what the old tokens sounded like there.
    old_ref = decode_full(mono, old, 1)[:, at * HOP : at * HOP + xf]
    assert snr_db(old_ref[:, :20], after[:, :20]) > 40


@pytest.mark.parametrize("changed", [0, 4, 5], ids=["first-ahead", "last-read", "not-read"])
def test_continuation_after_changed_lookahead(mono, changed):
    """A call at the stream position whose lookahead codes changed since the previous call (a
    prompt change right there) must not go on from what that call computed from the old ones.
    Frames 50-54 are what the previous call (stop 50) read beyond its stop; 55 it never read."""
    dec = StreamingDecoder(mono, audio_channels=1)
    old = _codes(1, 120, seed=8)
    new = old.clone()
    new[:, 50 + changed] = (old[:, 50 + changed] + 1) % 2048  # one frame's tokens change
    _stream(dec, old, [0, 25, 50])
    after = _stream(dec, new, [50, 75, 100])
    ref = decode_full(mono, new, 1)[:, 50 * HOP : 100 * HOP]
    xf = dec.crossfade
    assert snr_db(ref[:, xf:], after[:, xf:]) >= EXACT_DB


def test_rewind_beyond_history_restarts_fresh(mono):
    dec = StreamingDecoder(mono, audio_channels=1, history=16)
    codes = _codes(1, 200, seed=6)
    _stream(dec, codes, [0, 50, 100, 150])
    again = _stream(dec, codes, [80, 105, 130])  # 70 frames back, states kept for 16
    ref = decode_full(mono, codes, 1)[:, 80 * HOP : 130 * HOP]
    assert snr_db(ref, again) >= APPROX_DB


def test_fresh_start_mid_stream(stereo):
    """The first call may start anywhere: the LSTM warms up over `context` frames."""
    dec = StreamingDecoder(stereo, audio_channels=2)
    codes = _codes(2, 200, seed=7)
    streamed = _stream(dec, codes, [100, 120, 150, 190])
    ref = decode_full(stereo, codes, 2)[:, 100 * HOP : 190 * HOP]
    assert snr_db(ref, streamed) >= APPROX_DB


def test_missing_lookahead_or_context_is_refused(mono):
    dec = StreamingDecoder(mono, audio_channels=1)
    codes = _codes(1, 100)
    with pytest.raises(ValueError, match="lookahead"):
        dec.decode(codes[:, : 20 + dec.lookahead - 1], 0, 0, 20)
    with pytest.raises(ValueError, match="context"):
        dec.decode(codes[:, 40:], 40, 50, 60)  # 10 frames before start, context is 25
    with pytest.raises(ValueError, match="start < stop"):
        dec.decode(codes, 0, 30, 30)
    with pytest.raises(ValueError, match="codes must be"):
        dec.decode(codes[0], 0, 0, 20)
    with pytest.raises(ValueError, match="audio_channels"):
        StreamingDecoder(mono, audio_channels=3)
    with pytest.raises(ValueError, match="crossfade"):
        StreamingDecoder(mono, audio_channels=1, crossfade=641)
    with pytest.raises(ValueError, match="lookahead"):
        StreamingDecoder(mono, audio_channels=1, lookahead=2)
    with pytest.raises(ValueError, match="context"):
        StreamingDecoder(mono, audio_channels=1, context=3)


@pytest.mark.parametrize("streams", [1, 2, 3])
@pytest.mark.parametrize("hidden", [64, 1024], ids=["tiny", "musicgen"])
def test_float16_kernel_equals_float32_recurrence(streams, hidden):
    """The kernel's LSTM (float16 weights converted on the fly, vector sigmoid/tanh) gives what
    PyTorch's float32 ops give on the same rounded weights, for every frame's h and c, for one
    stream and for several decoded together (odd counts included)."""
    if not _kernel_expected():
        pytest.skip(f"no float16 LSTM kernel here: {native.unavailable_reason()}")
    torch.manual_seed(hidden + streams)
    lstm = nn.LSTM(hidden, hidden, 2)
    with torch.no_grad():
        for layer in range(2):
            getattr(lstm, f"weight_hh_l{layer}").copy_(getattr(lstm, f"weight_hh_l{layer}").half())
    fast = FrameLSTM(lstm)
    assert fast.float16
    slow = FrameLSTM(lstm)
    slow._w16 = None  # the float32 recurrence on the same weights
    x = torch.randn(12, streams, hidden)
    h0, c0 = 0.5 * torch.randn(2, streams, hidden), torch.randn(2, streams, hidden)
    with torch.inference_mode():
        top, hs, cs = fast.run(x, h0, c0)
        top_ref, hs_ref, cs_ref = slow.run(x, h0, c0)
    assert snr_db(hs_ref.numpy(), hs.numpy()) >= 120
    assert snr_db(cs_ref.numpy(), cs.numpy()) >= 120
    torch.testing.assert_close(top, top_ref, rtol=0, atol=2e-6)


def test_rounding_keeps_the_weights_near_and_refuses_the_out_of_range():
    """`round_lstm_weights` makes W_hh float16 values (what lets the kernel run), changes them by
    at most half a float16 step, leaves W_ih alone, and names a weight float16 can not hold."""
    codec = EncodecModel(EncodecConfig(hidden_size=16, num_filters=4, codebook_dim=16))
    lstm = codec.decoder.layers[1].lstm
    before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
    round_lstm_weights(codec)
    for name, p in lstm.named_parameters():
        if name.startswith("weight_hh"):
            assert torch.equal(p, p.half().float())
            assert not torch.equal(p, before[name])
            torch.testing.assert_close(p, before[name], rtol=2**-11, atol=2**-25)  # subnormals
        else:
            assert torch.equal(p, before[name])
    with torch.no_grad():
        lstm.weight_hh_l1[3, 5] = 1e5
    with pytest.raises(ValueError, match="weight_hh_l1"):
        round_lstm_weights(codec)


@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
def test_streams_decoded_together_equal_each_alone(request, channels):
    """Three streams decoded in one call per chunk give what each gives alone, through the first
    calls at frame 0, carried continuations, and a prompt change that rewinds one stream (its
    call then runs more LSTM frames than the others': a group of its own)."""
    codec = request.getfixturevalue("mono" if channels == 1 else "stereo")
    together = [StreamingDecoder(codec, audio_channels=channels) for _ in range(3)]
    alone = [StreamingDecoder(codec, audio_channels=channels) for _ in range(3)]
    codes = [_codes(channels, 200, seed=20 + i) for i in range(3)]
    changed = torch.cat([codes[1][:, :35], _codes(channels, 165, seed=30)], dim=1)
    # (start, stop) per stream per round; round 4 rewinds stream 1 to frame 35, new tokens
    rounds = [[(0, 10)] * 3, [(10, 20)] * 3, [(20, 30)] * 3, [(30, 40)] * 3]
    rounds += [[(40, 50), (35, 50), (40, 50)], [(50, 60)] * 3]
    batches: list[int] = []  # batch sizes the upsampling stack runs in a round

    def counted(upsample):
        def run(y, lo, hi, *, at_zero):
            batches.append(y.shape[0])
            return upsample(y, lo, hi, at_zero=at_zero)

        return run

    for dec in together:
        dec._upsample = counted(dec._upsample)
    for r, bounds in enumerate(rounds):
        calls = []
        for i, (start, stop) in enumerate(bounds):
            tokens = changed if (i == 1 and r >= 4) else codes[i]
            offset = max(0, start - together[i].context)
            calls.append((tokens[:, offset : stop + together[i].lookahead], offset, start, stop))
        batches.clear()
        outs = decode_together([(dec, *call) for dec, call in zip(together, calls, strict=True)])
        # one batch of all three streams, or the rewound stream alone beside the other two
        assert sorted(batches) == ([channels, 2 * channels] if r == 4 else [3 * channels]), r
        for i, (dec, call) in enumerate(zip(alone, calls, strict=True)):
            ref = dec.decode(*call)
            assert outs[i].shape == ref.shape
            assert snr_db(ref, outs[i]) >= 120, (r, i)


def test_decode_together_refuses_a_decoder_twice_and_mixed_codecs(mono, mono32):
    a, b = StreamingDecoder(mono, audio_channels=1), StreamingDecoder(mono32, audio_channels=1)
    codes = _codes(1, 20)
    with pytest.raises(ValueError, match="once"):
        decode_together([(a, codes, 0, 0, 10), (a, codes, 0, 0, 10)])
    with pytest.raises(ValueError, match="same codec"):
        decode_together([(a, codes, 0, 0, 10), (b, codes, 0, 0, 10)])
