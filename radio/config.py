"""The radio's settings: `config.toml` read once with `tomllib` into frozen dataclasses.

Every section is a frozen dataclass whose fields carry their default and a one-line comment
(`config.toml` at the top of the repository documents the same keys). `load_config` reads a file,
`parse_config` a dict; both reject an unknown key, a value of the wrong type or a bad
combination with a `ConfigError` naming the key, for example
`generation.top_k: must be in [0, 2048], got -1`.

Extending: add a field to a section (a new scalar key), or a field whose type is another
dataclass (a sub-table such as `[stations.icecast]`); `_build` handles both.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.blend import Blend
from engine.options import LoadOptions, SamplingOptions, WindowOptions
from radio.programme.options import (
    Days,
    SlotConfig,
    check_overlaps,
    check_station,
    parse_rate_limit,
)

if TYPE_CHECKING:
    from engine.clip import ClipLimits

ADMIN_TOKEN_ENV = "RADIO_ADMIN_TOKEN"
FRAME_RATE = 50  # MusicGen frames per second (every model: EnCodec 32 kHz, hop 640)
_STATION_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key."""


# `generation.chunk_seconds = "auto"`: one station's chunks are short, so a prompt change is
# heard soon; several stations' are longer, where the codec's cost per call weighs: decoding
# 20 frames a call instead of 10 made two int4 stations x1.04-1.10 faster on 2 cores
# (docs/benchmarks.md), and their prompt changes wait longer anyway
AUTO_CHUNK = 0.2
AUTO_CHUNK_STATIONS = 0.4
# `generation.steady_chunk_seconds = "auto"`: once a station has two of them ahead, its chunks
# are this long: the codec's per-call margin (lookahead, the next join's tail) and the step's
# fixed costs weigh less; one int8 station on 2 cores made x1.07 the audio per second with
# 25-frame reads than with 10-frame ones, and no more with 50 (docs/benchmarks.md)
AUTO_STEADY_CHUNK = 0.5


def _check_chunk(key: str, seconds: float | str, buffer_ahead: float) -> None:
    """A chunk length key (`chunk_seconds`, `steady_chunk_seconds`): "auto", or seconds in
    [0.02, 2] and at most half of `buffer_ahead`."""
    if isinstance(seconds, str):
        if seconds != "auto":
            raise ValueError(f'{key}: must be "auto" or seconds, got {seconds!r}')
    elif not 0.02 <= seconds <= 2:
        raise ValueError(f"{key}: must be in [0.02, 2] seconds, got {seconds}")
    elif seconds > buffer_ahead / 2:
        raise ValueError(
            f"{key}: must be at most half of buffer_ahead ({buffer_ahead}), got {seconds}"
        )


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"  # address to listen on ("127.0.0.1" = this machine only)
    port: int = 8000  # TCP port
    public_url: str = ""  # base URL for absolute stream links; "" = from each request's Host
    shutdown_seconds: float = 3.0  # how long Ctrl-C waits for connections to close
    trust_forwarded: bool = (
        False  # client address from X-Forwarded-For (only behind your own proxy)
    )
    state_file: str = ""  # JSON file keeping prompts and HLS numbering across restarts; "" = off

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ValueError(
                f"public_url: must start with http:// or https://, got {self.public_url!r}"
            )
        if self.shutdown_seconds < 0:
            raise ValueError(f"shutdown_seconds: must be >= 0, got {self.shutdown_seconds}")


def flat(*keys: str) -> dict[str, tuple[str, ...]]:
    """Field metadata of a nested dataclass whose fields `keys` are keys of its parent's own
    table: the engine's option dataclasses inside a section (`[generation] top_k` is
    `GenerationConfig.sampling.top_k`). Its default must be its class's defaults."""
    return {"flat": keys}


def renamed(**keys: str) -> dict[str, dict[str, str]]:
    """Field metadata of a nested dataclass (a table) whose TOML keys are not its fields' names:
    key=field (`[model] id` is `LoadOptions.model`)."""
    return {"keys": keys}


@dataclass(frozen=True)
class GenerationConfig:
    """`[generation]`: the engine's sampling and window options (their keys are this table's),
    each station's seed, and how far and in what steps the radio generates ahead."""

    # guidance_scale, temperature, top_k, top_p (engine.options.SamplingOptions; its `greedy`
    # and `seed` are not keys: the seed below is per station)
    sampling: SamplingOptions = field(
        default_factory=SamplingOptions,
        metadata=flat("guidance_scale", "temperature", "top_k", "top_p"),
    )
    seed: int = -1  # seed of each station's sampler (station i uses seed + i); -1 = random
    # window, context, prompt_context, warm_restarts (engine.options.WindowOptions)
    windows: WindowOptions = field(
        default_factory=WindowOptions,
        metadata=flat("window", "context", "prompt_context", "warm_restarts"),
    )
    buffer_ahead: float = 4.0  # seconds generated ahead of the clock (more = safer, slower prompts)
    # audio generated per worker step (smaller = faster prompt reaction); "auto": 0.2 s for one
    # station, 0.4 s for several (the codec's cost per second falls with its chunk: x1.04-1.10
    # the speed of two stations on a 2-core CPU)
    chunk_seconds: float | str = "auto"
    # audio per step while every station of the step has two of these ahead (the steady state:
    # prompt changes, the start and a station behind get `chunk_seconds`); "auto": 0.5 s (at
    # least `chunk_seconds`, at most a quarter of `buffer_ahead`); equal to `chunk_seconds`:
    # one length always
    steady_chunk_seconds: float | str = "auto"
    # a new prompt starts this many seconds after the moment being played; -1 = auto: at least
    # 0.5 s, and long enough for the engine's measured prefill, so the stream never falls behind
    prompt_horizon: float = -1.0
    # while generation cannot keep up with real time, window restarts re-read a shorter context
    # (half, then a quarter of `context`) and the whole of it again once it can (radio.ladder;
    # with warm restarts a shorter context shortens the stretch the warm rows cost extra)
    adaptive_restarts: bool = True
    # and when even the shortest restarts cannot keep up, decode with int4 weights (coarser
    # music, x1.5 the speed on a 2-core AVX2 CPU) until int8 ones can again, rather than let
    # listeners hear the bridge: "auto" where the model can (int8 weights on our CPU kernels;
    # the start-up log says which), true (refused by name where it cannot), false
    coarse_when_behind: bool | str = "auto"
    # and when even every layer's int4 weights cannot keep up, guidance off (each station
    # sampled from its prompt's rows alone, half the rows a step: music that follows its prompt
    # less closely) until it can again, rather than the bridge (with coarse_when_behind only)
    drop_guidance_when_behind: bool = True
    # a generation step that makes no progress for this long marks /healthz 503 with the
    # reason, so that Docker (with autoheal) or systemd restarts the radio
    stall_seconds: float = 60.0

    def validate(self) -> None:
        self.sampling.validate()
        self.windows.validate()
        if not 0.5 <= self.buffer_ahead <= 60:
            raise ValueError(f"buffer_ahead: must be in [0.5, 60] seconds, got {self.buffer_ahead}")
        _check_chunk("chunk_seconds", self.chunk_seconds, self.buffer_ahead)
        _check_chunk("steady_chunk_seconds", self.steady_chunk_seconds, self.buffer_ahead)
        if (
            not isinstance(self.chunk_seconds, str)
            and not isinstance(self.steady_chunk_seconds, str)
            and self.steady_chunk_seconds < self.chunk_seconds
        ):
            raise ValueError(
                f"steady_chunk_seconds: must be at least chunk_seconds ({self.chunk_seconds}), "
                f"got {self.steady_chunk_seconds}"
            )
        if not (0 <= self.prompt_horizon <= 10 or self.prompt_horizon == -1):
            raise ValueError(
                f"prompt_horizon: must be -1 (auto) or in [0, 10] seconds, got {self.prompt_horizon}"
            )
        if not 1 <= self.stall_seconds <= 3600:
            raise ValueError(
                f"stall_seconds: must be in [1, 3600] seconds, got {self.stall_seconds}"
            )
        if isinstance(self.coarse_when_behind, str) and self.coarse_when_behind != "auto":
            raise ValueError(
                'coarse_when_behind: must be true, false or "auto", '
                f"got {self.coarse_when_behind!r}"
            )

    def chunk_for(self, stations: int) -> float:
        """`chunk_seconds` for a radio of `stations` stations ("auto" resolved)."""
        if not isinstance(self.chunk_seconds, str):
            return self.chunk_seconds
        return min(AUTO_CHUNK if stations <= 1 else AUTO_CHUNK_STATIONS, self.buffer_ahead / 2)

    def steady_chunk_for(self, stations: int) -> float:
        """`steady_chunk_seconds` for a radio of `stations` stations ("auto" resolved): never
        shorter than `chunk_for`."""
        if isinstance(self.steady_chunk_seconds, str):
            steady = min(AUTO_STEADY_CHUNK, self.buffer_ahead / 4)
        else:
            steady = self.steady_chunk_seconds
        return max(steady, self.chunk_for(stations))

    def sampling_options(self, station_index: int = 0) -> SamplingOptions:
        """Station `station_index`'s sampling: `sampling` with its seed (`seed` + the index)."""
        seed = None if self.seed < 0 else self.seed + station_index
        return dataclasses.replace(self.sampling, seed=seed).validate()


@dataclass(frozen=True)
class AudioConfig:
    loudness_target: float = (
        -14.0
    )  # integrated loudness of the output, LUFS (-14 Spotify, -16 Apple)
    true_peak: float = -1.0  # true-peak ceiling, dBTP
    mp3_bitrate: int = 128  # MP3 mount bitrate, kbit/s
    output_sample_rate: int = 44100  # sample rate of the MP3 and HLS outputs, Hz
    mp3_burst_seconds: float = 1.0  # recent audio a new MP3 listener gets at once (fast start)
    listener_queue_seconds: float = 8.0  # audio a slow MP3 listener may lag before it is dropped

    def validate(self) -> None:
        if not -40 <= self.loudness_target <= -5:
            raise ValueError(
                f"loudness_target: must be in [-40, -5] LUFS, got {self.loudness_target}"
            )
        if not -20 <= self.true_peak <= 0:
            raise ValueError(f"true_peak: must be in [-20, 0] dBTP, got {self.true_peak}")
        if self.mp3_bitrate not in (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320):
            raise ValueError(f"mp3_bitrate: must be a standard MP3 bitrate, got {self.mp3_bitrate}")
        if self.output_sample_rate not in (32000, 44100, 48000):
            raise ValueError(
                f"output_sample_rate: must be 32000, 44100 or 48000, got {self.output_sample_rate}"
            )
        if not 0 <= self.mp3_burst_seconds <= 10:
            raise ValueError(f"mp3_burst_seconds: must be in [0, 10], got {self.mp3_burst_seconds}")
        if not 1 <= self.listener_queue_seconds <= 120:
            raise ValueError(
                f"listener_queue_seconds: must be in [1, 120], got {self.listener_queue_seconds}"
            )


@dataclass(frozen=True)
class HlsConfig:
    enabled: bool = True  # serve /hls/{station}/live.m3u8 (AAC in MPEG-TS)
    segment_seconds: float = 2.0  # length of one segment (EXT-X-TARGETDURATION rounds it up)
    playlist_segments: int = 6  # segments listed in the playlist (at least 3)
    bitrate: int = 96  # AAC bitrate, kbit/s
    dir: str = ""  # also write playlist and segments to this folder (for nginx/CDN); "" = off

    def validate(self) -> None:
        if not 0.5 <= self.segment_seconds <= 10:
            raise ValueError(f"segment_seconds: must be in [0.5, 10], got {self.segment_seconds}")
        if not 3 <= self.playlist_segments <= 30:
            raise ValueError(f"playlist_segments: must be in [3, 30], got {self.playlist_segments}")
        if not 16 <= self.bitrate <= 320:
            raise ValueError(f"bitrate: must be in [16, 320] kbit/s, got {self.bitrate}")


@dataclass(frozen=True)
class SecurityConfig:
    admin_token: str = (
        ""  # token for admin actions (Authorization: Bearer ...); "" = none; env RADIO_ADMIN_TOKEN
    )
    prompt_rate_limit: str = (
        "3 per 60 s"  # prompt changes per client address ("0 per 1 s" = admin only)
    )
    max_prompt_length: int = 200  # characters in a prompt
    allow_empty_prompt: bool = False  # accept "" (unconditional music) from listeners
    max_listeners: int = 100  # MP3 listeners per station; more get 503

    def validate(self) -> None:
        self.rate_limit()
        if not 1 <= self.max_prompt_length <= 2000:
            raise ValueError(
                f"max_prompt_length: must be in [1, 2000], got {self.max_prompt_length}"
            )
        if self.max_listeners < 0:
            raise ValueError(f"max_listeners: must be >= 0, got {self.max_listeners}")
        if self.admin_token and len(self.admin_token) < 8:
            raise ValueError("admin_token: must be at least 8 characters (or empty for no admin)")

    def rate_limit(self) -> tuple[int, float]:
        """(count, seconds) from "N per S s"."""
        return parse_rate_limit(self.prompt_rate_limit, "prompt_rate_limit")


@dataclass(frozen=True)
class ClipsConfig:
    """`[clips]`: seeding a station from an uploaded audio clip (admin only, `radio.uploads`)."""

    max_bytes: int = 20_000_000  # largest upload, bytes (30 s of 48 kHz stereo float: 11.5 MB)
    max_seconds: float = 30.0  # longest clip, seconds; at most 30 (MusicGen's training length)
    min_seconds: float = 1.0  # shortest clip, seconds
    max_decode_seconds: float = 10.0  # CPU time decoding one file may take (30 s of MP3: ~0.1 s)
    silence_dbfs: float = -60.0  # a clip whose peak is below this level is refused as silent

    def validate(self) -> None:
        if not 1024 <= self.max_bytes <= 500_000_000:
            raise ValueError(f"max_bytes: must be in [1024, 500000000], got {self.max_bytes}")
        self.limits()

    def limits(self) -> ClipLimits:
        from engine.clip import ClipLimits  # PyAV: imported when a clip is first needed

        return ClipLimits(
            max_bytes=self.max_bytes,
            max_seconds=self.max_seconds,
            min_seconds=self.min_seconds,
            max_decode_seconds=self.max_decode_seconds,
            silence_dbfs=self.silence_dbfs,
        ).validate()


@dataclass(frozen=True)
class WatchdogConfig:
    """`[watchdog]`: the music watchdog (`radio.watchdog`): silence, a stuck loop or a collapsed
    codebook, each answered by re-anchoring the station on a short, fresh context."""

    enabled: bool = True  # watch every station's music and re-anchor it when it goes wrong
    silence_db: float = -60.0  # audio quieter than this (dBFS, RMS of each 20 ms) is silent ...
    silence_seconds: float = 5.0  # ... and this long of it in a row is a problem
    loop_seconds: float = 20.0  # the stretch of recent music the loop detector looks at
    loop_share: float = 0.6  # a loop: this share of that stretch repeats blocks of tokens in it
    collapse_seconds: float = 10.0  # the stretch the collapse detector looks at
    collapse_tokens: int = 6  # a collapse: a codebook used fewer distinct tokens in that stretch
    context_seconds: float = 1.0  # recent music a re-anchor goes on from; 0 = none (prompt alone)
    crossfade_seconds: float = 0.5  # the old music fades into the re-anchored music over this long

    def validate(self) -> None:
        _in_range("silence_db", self.silence_db, -120, -20, " dBFS")
        _in_range("silence_seconds", self.silence_seconds, 0.5, 300, " seconds")
        _in_range("loop_seconds", self.loop_seconds, 2, 300, " seconds")
        _in_range("loop_share", self.loop_share, 0.05, 1, "")
        _in_range("collapse_seconds", self.collapse_seconds, 0.5, 300, " seconds")
        _in_range("collapse_tokens", self.collapse_tokens, 2, 256, "")
        _in_range("context_seconds", self.context_seconds, 0, 10, " seconds")
        _in_range("crossfade_seconds", self.crossfade_seconds, 0, 5, " seconds")


def _in_range(key: str, value: float, low: float, high: float, unit: str) -> None:
    if not low <= value <= high:
        raise ValueError(f"{key}: must be in [{low}, {high}]{unit}, got {value}")


@dataclass(frozen=True)
class IcecastConfig:
    """`[stations.icecast]`: also push this station to an Icecast2 server as a source."""

    url: str = ""  # the Icecast server, e.g. "http://icecast.example.com:8000"
    mount: str = ""  # mount on that server; "" = "/<station id>.mp3"
    user: str = "source"  # source user name
    password: str = ""  # source password (or use password_env)
    password_env: str = "ICECAST_SOURCE_PASSWORD"  # environment variable read first, when set
    public: bool = False  # list the stream in Icecast's public directory (YP)

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: must be http://host:port, got {self.url!r}")
        if self.mount and not self.mount.startswith("/"):
            raise ValueError(f"mount: must start with '/', got {self.mount!r}")

    def with_password(self, env: Mapping[str, str]) -> IcecastConfig:
        """This section with `password` resolved: the environment variable `password_env` when
        it is set and not empty, else `password`; ValueError naming the key when neither gives
        one."""
        from_env = env.get(self.password_env, "") if self.password_env else ""
        if from_env:
            return dataclasses.replace(self, password=from_env)
        if self.password:
            return self
        where = f", nor the environment variable {self.password_env}" if self.password_env else ""
        raise ValueError(f"password: no Icecast source password (not set here{where})")


@dataclass(frozen=True)
class StationConfig:
    id: str = "main"  # URL name: /main.mp3, /hls/main/live.m3u8 (a-z, 0-9, _ and -)
    name: str = "Endless Radio"  # shown to listeners (icy-name)
    description: str = "Music that never ends, written live by MusicGen"  # icy-description
    genre: str = "Various"  # icy-genre
    # what the station plays outside its schedule's slots: a text, or a blend
    # [{text, weight}, ...] (TOML and JSON); a text stays a str here, a blend is a `Blend`
    prompt: str | Blend = "calm lofi beat with piano"
    icecast: IcecastConfig | None = None  # [stations.icecast]: push to an Icecast2 server
    transition_seconds: float = 0.0  # glide from one prompt to the next over this long; 0 = switch
    timezone: str = "UTC"  # IANA time zone the schedule's days and times are in
    schedule: tuple[SlotConfig, ...] = ()  # [[stations.schedule]] day-parts; none = always `prompt`
    listener_prompts: str = (
        "now"  # a listener's prompt: "now" plays it, "queue" = a suggestion, "off"
    )
    listener_hold_minutes: float = 10.0  # a suggestion taken from the queue plays this long
    skip_threshold: float = 0.5  # a skip needs votes from this share of the listeners; 0 = no skips
    skip_minimum: int = 2  # ... and from at least this many addresses
    suggestion_rate_limit: str = "2 per 600 s"  # suggestions per client address
    vote_rate_limit: str = "30 per 60 s"  # upvotes and skip votes per client address
    max_suggestions: int = 20  # suggestions waiting in the queue at most
    suggestion_minutes: float = 120.0  # a suggestion not played within this long leaves the queue

    def validate(self) -> None:
        if not _STATION_ID.match(self.id):
            raise ValueError(f"id: must be 1-32 of a-z, 0-9, _ and - , got {self.id!r}")
        for key in ("name", "description", "genre"):
            if any(ord(c) < 32 for c in getattr(self, key)):
                raise ValueError(f"{key}: must not contain control characters")
        if isinstance(self.prompt, str):
            Blend.parse(self.prompt, "prompt")
        check_station(self)

    @property
    def blend(self) -> Blend:
        """`prompt` as a blend (a text is the blend of one)."""
        return self.prompt if isinstance(self.prompt, Blend) else Blend.parse(self.prompt)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    # [model]: how the engine loads MusicGen (engine.options.LoadOptions; its `model`, the hub id
    # or local folder, is the key `id` here: `radio tiny-model DIR` makes one)
    model: LoadOptions = field(default_factory=LoadOptions, metadata=renamed(id="model"))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    hls: HlsConfig = field(default_factory=HlsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    clips: ClipsConfig = field(default_factory=ClipsConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    stations: tuple[StationConfig, ...] = (StationConfig(),)

    def station(self, station_id: str) -> StationConfig:
        for s in self.stations:
            if s.id == station_id:
                return s
        raise KeyError(station_id)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read `path` (None = all defaults) and apply the environment (RADIO_ADMIN_TOKEN, the
    Icecast source passwords)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from e
    return parse_config(data, env=os.environ if env is None else env)


def parse_config(data: dict[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """A checked `Config` from a TOML-shaped dict and the environment `env` (RADIO_ADMIN_TOKEN,
    `[stations.icecast] password_env`); `ConfigError` names the first bad key."""
    env = env or {}
    config = _build(Config, data, "")
    token = env.get(ADMIN_TOKEN_ENV, "")
    if token and not config.security.admin_token:
        config = with_overrides(config, security={"admin_token": token})
    _check_stations(config.stations)
    _check_watchdog(config)
    return dataclasses.replace(config, stations=_icecast_passwords(config.stations, env))


def _icecast_passwords(
    stations: tuple[StationConfig, ...], env: Mapping[str, str]
) -> tuple[StationConfig, ...]:
    """Each `[stations.icecast]` with its source password resolved (ConfigError without one)."""
    out = []
    for i, s in enumerate(stations):
        if s.icecast is not None:
            try:
                s = dataclasses.replace(s, icecast=s.icecast.with_password(env))
            except ValueError as e:
                raise ConfigError(f"stations[{i}].icecast.{e}") from None
        out.append(s)
    return tuple(out)


def with_overrides(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `config` with some keys replaced, e.g. `model={"id": DIR}`; checked again."""
    changed = {}
    for name, values in sections.items():
        section = getattr(config, name)
        rename = _metadata(Config, name).get("keys")
        table = {**_table(section, rename), **values}
        changed[name] = _build(type(section), table, name, rename)
    return dataclasses.replace(config, **changed)


# the station keys the admin may change live (`with_programme`); kept in the state file
PROGRAMME_KEYS = (
    "timezone",
    "transition_seconds",
    "schedule",
    "listener_prompts",
    "listener_hold_minutes",
    "skip_threshold",
    "skip_minimum",
)


def with_programme(station: StationConfig, data: dict[str, Any], where: str = "") -> StationConfig:
    """`station` with some of its `PROGRAMME_KEYS` replaced from a JSON/TOML-shaped dict (the
    admin API, the state file), checked exactly like `config.toml`; ConfigError names the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'programme'}: must be an object")
    hints = typing.get_type_hints(StationConfig)
    values = {}
    for key, value in data.items():
        if key not in PROGRAMME_KEYS:
            raise ConfigError(
                f"{_join(where, key)}: not a programme key (known: {', '.join(PROGRAMME_KEYS)})"
            )
        values[key] = _convert(hints[key], value, _join(where, key))
    new = dataclasses.replace(station, **values)
    _validate(new, where)
    try:
        check_overlaps(new.schedule, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return new


def programme_settings(station: StationConfig) -> dict[str, Any]:
    """The station's `PROGRAMME_KEYS` in the JSON/TOML shape `with_programme` reads back."""
    out: dict[str, Any] = {k: getattr(station, k) for k in PROGRAMME_KEYS if k != "schedule"}
    out["schedule"] = [
        {
            "name": slot.name,
            "days": slot.days.label(),
            "start": slot.start,
            "end": slot.end,
            "prompts": [b.to_value() for b in slot.prompts],
            "rotate_minutes": slot.rotate_minutes,
            "order": slot.order,
            "transition_seconds": slot.transition_seconds,
        }
        for slot in station.schedule
    ]
    return out


def _check_watchdog(config: Config) -> None:
    """A re-anchor's context must fit in the context a window restart takes."""
    most = config.generation.windows.context / FRAME_RATE
    if config.watchdog.context_seconds > most:
        raise ConfigError(
            f"watchdog.context_seconds: must be at most generation.context ({most:g} s), "
            f"got {config.watchdog.context_seconds}"
        )


def _check_stations(stations: tuple[StationConfig, ...]) -> None:
    if not stations:
        raise ConfigError("stations: at least one [[stations]] is needed")
    seen: set[str] = set()
    for i, s in enumerate(stations):
        if s.id in seen:
            raise ConfigError(f"stations[{i}].id: {s.id!r} is used twice")
        seen.add(s.id)
        try:
            check_overlaps(s.schedule, f"stations[{i}]")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def table_keys(cls: Any, rename: Mapping[str, str] | None = None) -> dict[str, tuple[str, ...]]:
    """The TOML keys of dataclass `cls`'s table -> the fields each sets: (field,), or (nested
    field, its field) for a `flat` one; `rename` (key -> field) from the parent's `renamed`."""
    names = {f: k for k, f in (rename or {}).items()}
    keys: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        if "flat" in f.metadata:
            keys.update({key: (f.name, key) for key in f.metadata["flat"]})
        else:
            keys[names.get(f.name, f.name)] = (f.name,)
    return keys


def section_keys(section: str) -> list[str]:
    """The keys a user may set in a section of config.toml, e.g. "model", "stations.icecast"."""
    cls: Any = Config
    rename = None
    for name in section.split("."):
        rename = _metadata(cls, name).get("keys")
        cls = _dataclass_in(typing.get_type_hints(cls)[name])
    return list(table_keys(cls, rename))


def model_key(name: str) -> str:
    """The `[model]` key of a `LoadOptions` field (its `model` is `id`)."""
    rename = _metadata(Config, "model")["keys"]
    return {f: k for k, f in rename.items()}.get(name, name)


def _dataclass_in(hint: Any) -> Any:
    """The dataclass in a field's type: X, X | None, tuple[X, ...]."""
    if dataclasses.is_dataclass(hint):
        return hint
    (found,) = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
    return found


def _metadata(cls: Any, name: str) -> Mapping[str, Any]:
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


def _table(obj: Any, rename: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The TOML table of a section built by `_build` (the inverse for scalar keys)."""
    table = {}
    for key, path in table_keys(type(obj), rename).items():
        value = obj
        for name in path:
            value = getattr(value, name)
        table[key] = value
    return table


def _build(cls: Any, table: Any, where: str, rename: Mapping[str, str] | None = None) -> Any:
    """An instance of dataclass `cls` from a TOML table, strictly typed, validated. `rename`:
    TOML key -> field, where they differ (`renamed`)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where or 'config'}: must be a table")
    keys = table_keys(cls, rename)
    for key in table:
        if key not in keys:
            raise ConfigError(
                f"{_join(where, key)}: unknown key (known: {', '.join(sorted(keys))})"
            )
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}  # a flat field's keys
    for key, value in table.items():
        name, *inner = keys[key]
        if inner:
            nested.setdefault(name, {})[inner[0]] = value
        else:
            sub_rename = _metadata(cls, name).get("keys")
            values[name] = _convert(hints[name], value, _join(where, key), sub_rename)
    for name, sub_table in nested.items():
        values[name] = _build(hints[name], sub_table, where)
    obj = cls(**values)
    _validate(obj, where, rename)
    return obj


def _convert(hint: Any, value: Any, where: str, rename: Mapping[str, str] | None = None) -> Any:
    origin = typing.get_origin(hint)
    if hint in _VALUE_TYPES:  # a value with its own shape and parser (a blend, days)
        try:
            return _VALUE_TYPES[hint](value, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if origin is tuple:  # tuple[X, ...]: an array of tables such as [[stations]]
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be an array")
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):  # X | None: an optional sub-table
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if str in args and isinstance(value, str):  # `str | Blend`: a text stays a text
            return value
        return _convert([a for a in args if a is not str][0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, rename)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: must be an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{where}: must be a {hint.__name__}, got {value!r}")
    return value


_VALUE_TYPES: dict[Any, Callable[[Any, str], Any]] = {Blend: Blend.parse, Days: Days.parse}


def _validate(obj: Any, where: str, rename: Mapping[str, str] | None = None) -> None:
    """`obj.validate()`, its ValueError ("key: message") as a ConfigError naming the key where
    it sits in config.toml."""
    check = getattr(obj, "validate", None)
    if check is None:
        return
    try:
        check()
    except ValueError as e:
        field_name, sep, rest = str(e).partition(":")
        key = {f: k for k, f in (rename or {}).items()}.get(field_name, field_name)
        message = f"{key}{sep}{rest}"
        raise ConfigError(f"{where}.{message}" if where else message) from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
