"""CPU cost per second of audio of the loudness normalizer, the MP3 encoder and the HLS segmenter.

python bench/audio_cost.py
"""

import time
from datetime import UTC, datetime

import numpy as np

from radio.encoders import Mp3Encoder
from radio.hls import HlsSegmenter
from radio.loudness import LoudnessNormalizer

SAMPLE_RATE, SECONDS, CHUNK = 32000, 60, 640  # 20 ms clock ticks


def cost_ms_per_audio_second(fn, pcm: np.ndarray) -> float:
    began = time.process_time()
    for i in range(0, pcm.shape[1], CHUNK):
        fn(pcm[:, i : i + CHUNK])
    return (time.process_time() - began) / SECONDS * 1000


def main() -> None:
    rng = np.random.default_rng(0)
    for channels in (1, 2):
        pcm = (rng.standard_normal((channels, SAMPLE_RATE * SECONDS)) * 0.3).astype(np.float32)
        loudness = LoudnessNormalizer(SAMPLE_RATE, channels)
        mp3 = Mp3Encoder(SAMPLE_RATE, channels, 128, output_sample_rate=44100)
        hls, now = HlsSegmenter(SAMPLE_RATE, channels, output_sample_rate=48000), datetime.now(UTC)
        print(
            f"{channels} ch: loudness {cost_ms_per_audio_second(loudness.process, pcm):.1f} ms, "
            f"mp3 {cost_ms_per_audio_second(mp3.encode, pcm):.1f} ms, "
            f"hls {cost_ms_per_audio_second(lambda p, h=hls, t=now: h.push(p, t), pcm):.1f} ms "
            "CPU per second of audio"
        )


if __name__ == "__main__":
    main()
