"""The reference: tokens from `transformers`' own `MusicgenForConditionalGeneration.generate`.

`generate` returns audio; the codes it decodes are captured by wrapping the audio encoder's
`decode`, which receives them frame-aligned (after the delay pattern is reverted).
"""

from __future__ import annotations

import functools

import torch


def reference_tokens(
    model, processor, prompt: str, steps: int, guidance: float, prompt_frames=None, audio=None
):
    """Greedy reference tokens [K, T] for `steps` new decoder steps (T = steps + 1 - K_delay - 1
    for a fresh start, plus the prompt frames when given). `audio` [C, N] float32 at the codec's
    rate: an audio prompt, which `generate` encodes itself (`input_values`)."""
    captured: list[torch.Tensor] = []
    codec = model.audio_encoder
    original = codec.decode

    def capture(codes, *args, **kwargs):
        captured.append(codes[0, 0].clone())  # [K_half_or_K, T]
        return original(codes[..., :1], *args, **kwargs)

    kwargs = dict(do_sample=False, guidance_scale=guidance, max_new_tokens=steps)
    if prompt:
        inputs = processor(text=[prompt], return_tensors="pt", padding=True)
    else:
        inputs = model.get_unconditional_inputs(1)
        inputs = {
            "encoder_outputs": inputs.encoder_outputs,
            "attention_mask": inputs.attention_mask,
        }
    if prompt_frames is not None:
        kwargs["decoder_input_ids"] = prompt_frames.reshape(-1, prompt_frames.shape[-1])
    if audio is not None:
        kwargs["input_values"] = torch.as_tensor(audio)[None]  # [1, C, N]
    codec.decode = capture
    try:
        with torch.inference_mode():
            model.generate(**inputs, **kwargs)
    finally:
        codec.decode = original
    if len(captured) == 1:
        return captured[0]
    left, right = captured
    stereo = torch.empty(left.shape[0] * 2, left.shape[1], dtype=left.dtype)
    stereo[0::2], stereo[1::2] = left, right
    return stereo


@torch.inference_mode()
def reference_rows(model, texts: list[str], frames: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [len(texts) + 1, T, K, V] of `MusicgenForConditionalGeneration`'s
    own forward over the delayed layout of `frames` [K, N] (T = N + 1 positions from BOS; mono):
    one row per text, then the null row (zero text states and a zero attention mask, as its
    guidance makes it). `model`: an `engine.MusicModel` (transformers' model and processor are
    loaded from its folder, in float32)."""
    from engine.delay import codebook_delays, delayed_layout

    hf, processor = transformers_model(model.name)
    delays = codebook_delays(model.num_codebooks, model.channels)
    ids = delayed_layout(frames, delays, frames.shape[1] + 1)
    assert bool((ids >= 0).all())
    rows = []
    for text in texts:
        inputs = processor(text=[text], return_tensors="pt", padding=True)
        rows.append(hf(**inputs, decoder_input_ids=ids).logits)  # [K, T, V]
    inputs = processor(text=[texts[0]], return_tensors="pt", padding=True)
    hidden = hf.text_encoder(**inputs).last_hidden_state
    null = hf(
        encoder_outputs=(torch.zeros_like(hidden),),
        attention_mask=torch.zeros_like(inputs["attention_mask"]),
        decoder_input_ids=ids,
    ).logits
    return torch.stack([*rows, null]).transpose(1, 2)  # [R, T, K, V]


@functools.cache
def transformers_model(folder: str):
    """(transformers' `MusicgenForConditionalGeneration`, its processor) of a model folder, in
    float32: the reference, loaded once per folder."""
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    return model, AutoProcessor.from_pretrained(folder)
