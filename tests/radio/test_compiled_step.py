"""`radio serve` with the decoder step compiled (`[model] compile = "compile"`: what a GPU runs,
there with CUDA graphs), the tiny model on the CPU: it compiles once before the first sound,
and the row layouts a programme makes while on air (a transition's glide rows into a blend of
three) run that code: the log says so, and no compile happens again."""

from __future__ import annotations

import time

from tests.helpers import get_json, post_json, start_radio_serve


def test_a_compiled_radio_glides_into_a_blend_without_compiling_again(tiny_model_dir, tmp_path):
    proc, base = start_radio_serve(
        tiny_model_dir,
        tmp_path,
        'compile = "compile"\n[generation]\nseed = 2\n[security]\nadmin_token = "compiled-step"\n',
    )
    try:
        blend = [
            {"text": "bells", "weight": 1.0},
            {"text": "strings", "weight": 2.0},
            {"text": "drums", "weight": 1.0},
        ]
        status, _, body = post_json(
            f"{base}/api/stations/main/prompt",
            {"prompt": blend, "transition_seconds": 1.0},
            {"Authorization": "Bearer compiled-step"},
        )
        assert status == 202, body
        time.sleep(body["heard_in_seconds"] + 3.0)  # heard, glided, and on in the blend
        health = get_json(f"{base}/healthz")
        assert health["status"] == "ok", health
    finally:
        proc.terminate()
        proc.wait(15)
    log = (tmp_path / "radio-serve.log").read_text()
    assert log.count("the decoder step compiled in") == 1, log
    assert "compiled again" not in log and "could not be compiled" not in log, log
    assert "Traceback" not in log and " ERROR " not in log, log
