"""The README and config.toml name every config key a user can set (the config's dataclasses are
the truth), and every benchmark script the README quotes exists."""

import dataclasses
import re
from pathlib import Path

from radio import config as cfg

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CONFIG_TOML = (ROOT / "config.toml").read_text()


def sections() -> list[str]:
    """Every table of config.toml: each `Config` field that is a dataclass (or a tuple of them,
    `[[stations]]`), and the stations' sub-tables."""
    found = [f.name for f in dataclasses.fields(cfg.Config)]
    return [*found, "stations.icecast", "stations.schedule"]


def test_every_config_key_is_in_the_readme_and_config_toml():
    missing_readme, missing_toml = [], []
    for section in sections():
        for key in cfg.section_keys(section):
            if key in ("icecast", "schedule") and section == "stations":
                continue  # tables of their own
            if f"`{key}`" not in README:
                missing_readme.append(f"{section}.{key}")
            if not re.search(rf"^#? ?{key} *=", CONFIG_TOML, re.M):
                missing_toml.append(f"{section}.{key}")
    assert not missing_readme, f"README lacks: {missing_readme}"
    assert not missing_toml, f"config.toml lacks: {missing_toml}"


def test_the_keys_are_the_documented_ones():
    """The engine's option dataclasses nested in the config keep the keys users know."""
    assert cfg.section_keys("model") == ["id", "device", "dtype", "quantize", "compile", "kv_cache"]
    generation = cfg.section_keys("generation")
    for key in ("guidance_scale", "temperature", "top_k", "top_p", "seed", "window", "context"):
        assert key in generation
    assert "greedy" not in generation and "sampling" not in generation


def test_every_bench_script_the_readme_runs_exists():
    scripts = set(re.findall(r"python (bench/[\w/]+\.py)", README))
    assert scripts, "the README quotes no benchmark command"
    for script in scripts:
        assert (ROOT / script).exists(), script


def test_the_readme_links_to_docs_that_exist():
    for link in set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", README)):
        assert (ROOT / link).exists(), link
