"""Long-lived PyAV audio encoders fed float32 PCM in chunks of any size.

One encoder per output lives as long as the station: `Mp3Encoder` turns PCM into raw MP3 frames
(1152 samples each, ready to write to an Icecast source or an HTTP listener as they come), and
`AacEncoder` turns PCM into AAC packets (1024 samples each) with continuous timestamps, for the
HLS segmenter to mux. If the output sample rate or channel count differs from the input, an
`av.AudioResampler` converts on the way in; its `frame_size` option does the buffering, so the
codec always sees whole frames whatever chunk sizes the caller pushes.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

_LAYOUTS = {1: "mono", 2: "stereo"}


def _layout(channels: int, key: str) -> str:
    if channels not in _LAYOUTS:
        raise ValueError(f"{key}: {channels} channels not supported (1 or 2)")
    return _LAYOUTS[channels]


class _PyAvEncoder:
    """A codec context, a resampler that cuts whole codec frames, and a sample counter."""

    def __init__(
        self,
        codec: str,
        sample_rate: int,
        channels: int,
        bitrate_kbps: int,
        output_sample_rate: int | None,
        output_channels: int | None,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if bitrate_kbps <= 0:
            raise ValueError(f"bitrate_kbps must be positive, got {bitrate_kbps}")
        self.sample_rate = sample_rate  # input rate
        self.channels = channels  # input channels
        self._in_layout = _layout(channels, "channels")
        self.output_sample_rate = output_sample_rate or sample_rate
        self.output_channels = output_channels or channels
        out_layout = _layout(self.output_channels, "output_channels")
        ctx = av.CodecContext.create(codec, "w")
        assert isinstance(ctx, av.AudioCodecContext), f"{codec} is not an audio codec"
        ctx.sample_rate = self.output_sample_rate
        ctx.layout = out_layout
        ctx.format = "fltp"
        ctx.bit_rate = bitrate_kbps * 1000
        ctx.time_base = Fraction(1, self.output_sample_rate)
        ctx.open()
        self.codec_context = ctx
        self.frame_size: int = ctx.frame_size  # samples per codec frame at the output rate
        self._resampler = av.AudioResampler(
            format="fltp",
            layout=out_layout,
            rate=self.output_sample_rate,
            frame_size=self.frame_size,
            threads=1,  # a station's encoders run on the thread that feeds them, no team
        )
        self._pts_in = 0  # input samples pushed so far
        self._pts_out = 0  # output-rate samples handed to the codec so far
        self._flushed = False

    def _packets(self, pcm: np.ndarray | None) -> list[av.Packet]:
        """Encode pcm [C, N] float32 (None = flush) into the packets the codec has ready."""
        if self._flushed:
            raise RuntimeError("encoder already flushed")
        if pcm is None:
            self._flushed = True
            frames = self._resampler.resample(None)
        else:
            pcm = np.ascontiguousarray(pcm, dtype=np.float32)
            if pcm.ndim != 2 or pcm.shape[0] != self.channels:
                raise ValueError(f"pcm must be [{self.channels}, N], got {pcm.shape}")
            if pcm.shape[1] == 0:
                return []
            frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout=self._in_layout)
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts_in
            frame.time_base = Fraction(1, self.sample_rate)
            self._pts_in += pcm.shape[1]
            frames = self._resampler.resample(frame)
        packets: list[av.Packet] = []
        for f in frames:
            f.pts = self._pts_out  # continuous output-sample count: no gaps, no jumps
            f.time_base = self.codec_context.time_base
            self._pts_out += f.samples
            packets.extend(self.codec_context.encode(f))
        if pcm is None:
            packets.extend(self.codec_context.encode(None))
        return packets


class Mp3Encoder(_PyAvEncoder):
    """PCM [C, N] float32 -> raw MP3 frames (libmp3lame, CBR), for Icecast/ICY listeners."""

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        bitrate_kbps: int = 128,
        *,
        output_sample_rate: int | None = None,  # e.g. 44100 from a 32000 input; None = same
        output_channels: int | None = None,  # e.g. 2 to upmix mono; None = same
    ) -> None:
        super().__init__(
            "libmp3lame", sample_rate, channels, bitrate_kbps, output_sample_rate, output_channels
        )

    def encode(self, pcm: np.ndarray) -> bytes:
        """MP3 frames for pcm [C, N]; may be b"" while the FIFO fills (1152 samples a frame)."""
        return b"".join(bytes(p) for p in self._packets(pcm))

    def flush(self) -> bytes:
        """The last frames (the FIFO padded to a whole frame); the encoder is done afterwards."""
        return b"".join(bytes(p) for p in self._packets(None))


class AacEncoder(_PyAvEncoder):
    """PCM [C, N] float32 -> AAC-LC packets (FFmpeg's native encoder) for the HLS muxer.

    Packets carry pts/duration in `time_base` = 1/output_sample_rate; pts are continuous (the
    first is negative: the encoder's priming delay of `initial_padding` samples). The muxer needs
    `extradata` (the AudioSpecificConfig) to write ADTS into MPEG-TS.
    """

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        bitrate_kbps: int = 96,
        *,
        output_sample_rate: int | None = None,
        output_channels: int | None = None,
    ) -> None:
        super().__init__(
            "aac", sample_rate, channels, bitrate_kbps, output_sample_rate, output_channels
        )
        self.time_base = Fraction(1, self.output_sample_rate)
        self.extradata: bytes = bytes(self.codec_context.extradata or b"")
        # Priming samples the encoder puts before the first input sample (1024 for FFmpeg's aac).
        self.initial_padding: int = -1  # known from the first packet's pts

    def encode(self, pcm: np.ndarray) -> list[av.Packet]:
        """AAC packets for pcm [C, N] (1024 samples each), in order."""
        return self._note_padding(self._packets(pcm))

    def flush(self) -> list[av.Packet]:
        """The last packets; the encoder is done afterwards."""
        return self._note_padding(self._packets(None))

    def _note_padding(self, packets: list[av.Packet]) -> list[av.Packet]:
        if packets and self.initial_padding < 0:
            self.initial_padding = -timestamp(packets[0].pts)
        return packets


def timestamp(value: int | None) -> int:
    """A packet's pts or duration (always set on what an audio encoder returns)."""
    assert value is not None, "an encoded packet without a timestamp"
    return int(value)
