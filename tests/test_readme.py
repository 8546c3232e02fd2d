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
    assert cfg.section_keys("model") == [
        "id", "device", "dtype", "quantize", "compile", "kv_cache", "codec"
    ]  # fmt: skip
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


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation but hyphens dropped, each
    space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (outside code blocks)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_link_to_a_section_finds_it():
    """Links like docs/benchmarks.md#prompt-changes (or #real-models-cpu-and-gpu within a file)
    name a heading that exists: sections are renamed as the docs move on."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)#([\w-]+)\)", page.read_text()):
            linked = (page.parent / target).resolve() if target else page
            if not linked.exists() or anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, broken


def test_the_cafe_example_loads_and_plays_its_day_parts():
    """The README's café programme is a valid config, and its slots fall where the text says."""
    import datetime as dt
    import tomllib

    from radio.config import parse_config
    from radio.programme.schedule import NO_SLOT, Schedule

    block = re.search(r"```toml\n(\[\[stations\]\]\nid = \"cafe\".*?)```", README, re.S)
    assert block, "the README has no café example"
    station = parse_config(tomllib.loads(block.group(1))).stations[0]
    schedule = Schedule(station.schedule, station.timezone)
    names = [slot.name for slot in station.schedule]

    def playing(day: int, hour: int, minute: int = 0) -> str:
        local = dt.datetime(2026, 12, day, hour, minute, tzinfo=schedule.zone)  # 2026-12-07: Monday
        slot = schedule.segment_at(local.timestamp()).slot
        return "prompt" if slot == NO_SLOT else names[slot]

    assert [playing(7, h) for h in (6, 7, 11)] == ["prompt", "morning", "morning"]
    assert [playing(7, 11, 30), playing(7, 14, 29), playing(7, 15)] == ["lunch", "lunch", "prompt"]
    assert [playing(7, 18), playing(7, 21, 59), playing(7, 22)] == ["evening", "evening", "prompt"]
    assert [playing(6, 12), playing(6, 9), playing(6, 19)] == [
        "prompt",
        "morning",
        "evening",
    ]  # Sunday
