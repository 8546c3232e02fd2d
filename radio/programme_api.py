"""The programme's API: prompts and blends, the listeners' queue, votes and skips, the admin's
pin, schedule and clip. Every action goes through the station's director
(`radio.programme.director`); what it decides is played by `radio.programme_runner`.

| route | who | what |
| --- | --- | --- |
| `POST /api/stations/{id}/prompt` | anyone | `{"prompt": "..." or [{text, weight}, ...], "transition_seconds": 5}`: `now` plays it (202, when heard), `queue` makes it a suggestion (202 with it), `off` 403; the admin's plays now |
| `GET /api/stations/{id}/suggestions` | anyone | the queue with votes and the skip tally |
| `POST /api/stations/{id}/suggestions` | anyone | `{"prompt": ...}`: a suggestion (`queue` mode only) |
| `POST /api/stations/{id}/suggestions/{n}/vote` | anyone | an upvote (one per address per suggestion) |
| `DELETE /api/stations/{id}/suggestions/{n}` | admin | remove a suggestion |
| `DELETE /api/stations/{id}/suggestions` | admin | clear the queue |
| `POST /api/stations/{id}/skip` | anyone | a skip vote (one per address per item) |
| `POST /api/stations/{id}/pin` | admin | `{"prompt": ..., "minutes": 60, "transition_seconds": 5}`: nothing else changes the music |
| `DELETE /api/stations/{id}/pin` | admin | unpin: the schedule resumes |
| `GET /api/stations/{id}/schedule` | anyone | the programme settings (timezone, slots, listener rules) and today |
| `PUT /api/stations/{id}/schedule` | admin | replace programme keys, checked exactly like config.toml, kept in the state file |
| `POST /api/stations/{id}/clip` | admin | an audio file (raw or multipart, `prompt` field or query): the station continues from it |

Input is checked like the config (errors name the field: `prompt[1].weight: must be > 0`);
refusals are 4xx with a JSON reason: `off`/`pinned` 403, `not_found` 404, `already_voted`,
`queue_full`, `no_skip` 409, `rate_limited` 429 with Retry-After (`Refused.code`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from aiohttp import web

from engine.blend import MAX_TEXT_LENGTH, Blend
from radio.access import client_address, is_admin, require_admin
from radio.api import station_of
from radio.config import ConfigError, programme_settings, with_programme
from radio.history import iso
from radio.jsonbody import json_depth, read_json_object
from radio.middleware import ApiError
from radio.programme.options import MAX_TRANSITION_SECONDS
from radio.programme.votes import Refused
from radio.programme_runner import StationProgramme
from radio.service import RADIO, Radio
from radio.timing import Applied, NotRunning
from radio.uploads import clip_json

MAX_SCHEDULE_BODY = 128 * 1024  # bytes of JSON in a schedule (PUT .../schedule)
STATUS = {  # Refused.code -> HTTP status
    "off": 403,
    "pinned": 403,
    "not_found": 404,
    "already_voted": 409,
    "queue_full": 409,
    "no_skip": 409,
    "rate_limited": 429,
}


# ---- reading requests ------------------------------------------------------------------------


def programme_of(request: web.Request) -> tuple[Radio, StationProgramme]:
    radio = request.app[RADIO]
    return radio, radio.programmes[station_of(request).id]


def check_fields(data: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            raise ApiError(400, f"unknown field {key!r} (known: {', '.join(allowed)})")
    for key in required:
        if key not in data:
            raise ApiError(400, f"missing field {key!r}")


def parse_blend(value: Any, radio: Radio, admin: bool, where: str = "prompt") -> Blend:
    """A text or a blend `[{text, weight}, ...]`, cleaned and bounded like every prompt (the
    listeners' length limit and empty-prompt rule, or the admin's)."""
    sec = radio.config.security
    try:
        return Blend.parse(
            value,
            where,
            max_length=MAX_TEXT_LENGTH if admin else sec.max_prompt_length,
            allow_empty=admin or sec.allow_empty_prompt,
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def number_field(data: dict[str, Any], key: str, low: float, high: float) -> float | None:
    """An optional number in [low, high]; 400 naming the field otherwise."""
    if key not in data:
        return None
    value = data[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ApiError(400, f"{key}: must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def refused(e: Refused) -> ApiError:
    headers = None
    if e.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
    return ApiError(STATUS[e.code], str(e), headers)


async def applied(task: asyncio.Task[Applied] | None) -> Applied | None:
    """Wait for a change sent to the engine (None: nothing had to change)."""
    if task is None:
        return None
    try:
        result: Applied = await task
    except NotRunning as e:
        raise ApiError(503, str(e)) from None
    except TimeoutError:
        raise ApiError(503, "the generator did not take the change in time; try again") from None
    except ValueError as e:
        raise ApiError(400, f"the engine refused the prompt: {e}") from None
    return result


def playing_json(prog: StationProgramme, done: Applied | None) -> dict[str, Any]:
    """What a change's answer says: what plays now and, when it changed, when it is heard."""
    cur = prog.director.current
    assert cur is not None, "the director was started"
    out: dict[str, Any] = {
        "station": prog.station.id,
        "prompt": cur.blend.describe(),
        "blend": cur.blend.to_json(),
        "source": cur.source,
    }
    if done is None:  # it plays already
        out.update(unchanged=True, frame=None, heard_in_seconds=0.0)
    else:
        out["frame"] = done.frame
        out["heard_in_seconds"] = round(done.heard_in, 3)
        out["heard_at"] = iso(done.heard_at)
    return out


def check_rate(request: web.Request, radio: Radio) -> None:
    """ApiError 403 when only the admin may change prompts, 429 when this address changed
    too many lately (`security.prompt_rate_limit`: prompts played at once, mode `now`)."""
    if radio.limiter.count == 0:
        raise ApiError(403, "on this radio only the admin changes the prompt")
    wait = radio.limiter.check(client_address(request))
    if wait > 0:
        raise ApiError(
            429,
            f"too many prompt changes from your address; try again in {math.ceil(wait)} s",
            {"Retry-After": str(math.ceil(wait))},
        )


# ---- prompts and suggestions ---------------------------------------------------------------------


async def post_prompt(request: web.Request) -> web.Response:
    requested_at = time.monotonic()
    radio, prog = programme_of(request)
    admin = is_admin(request)
    data = await read_json_object(request)
    check_fields(data, ("prompt", "transition_seconds"), ("prompt",))
    blend = parse_blend(data["prompt"], radio, admin)
    glide = number_field(data, "transition_seconds", 0, MAX_TRANSITION_SECONDS)
    if admin:
        prog.director.admin_prompt(blend, glide)
        return await _play(prog, requested_at)
    if glide is not None:
        raise ApiError(
            403, "transition_seconds is for the admin; listeners glide as the station does"
        )
    if prog.director.station.listener_prompts == "queue":
        return _suggested(prog, request, blend)
    if prog.director.station.listener_prompts == "now":
        check_rate(request, radio)
    try:
        prog.director.listener_prompt(client_address(request), blend)
    except Refused as e:
        raise refused(e) from None
    return await _play(prog, requested_at)


async def _play(prog: StationProgramme, requested_at: float) -> web.Response:
    done = await applied(prog.tick(requested_at))
    return web.json_response(playing_json(prog, done), status=202)


def _suggested(prog: StationProgramme, request: web.Request, blend: Blend) -> web.Response:
    try:
        s = prog.director.listener_prompt(client_address(request), blend)
    except Refused as e:
        raise refused(e) from None
    assert s is not None, "queue mode answers with the suggestion"
    prog.publish_queue()
    queue = [x.id for x in prog.director.votes.queue(prog.director.clock())]
    return web.json_response(
        {
            "station": prog.station.id,
            "suggestion": s.to_json(),
            "position": queue.index(s.id) + 1,
            "next": _next_at(prog),
        },
        status=202,
    )


def _next_at(prog: StationProgramme) -> float | None:
    nxt = prog.director.upcoming()
    return None if nxt is None else nxt.at


async def get_suggestions(request: web.Request) -> web.Response:
    _, prog = programme_of(request)
    return web.json_response({"station": prog.station.id, **prog.queue_json()})


async def post_suggestion(request: web.Request) -> web.Response:
    radio, prog = programme_of(request)
    data = await read_json_object(request)
    check_fields(data, ("prompt",), ("prompt",))
    blend = parse_blend(data["prompt"], radio, is_admin(request))
    if prog.director.station.listener_prompts != "queue":
        raise ApiError(
            403,
            f"this station takes no suggestions (listener_prompts = "
            f"{prog.director.station.listener_prompts!r})",
        )
    return _suggested(prog, request, blend)


def _suggestion_id(request: web.Request) -> int:
    text = request.match_info["suggestion"]
    if not text.isdigit() or len(text) > 9:
        raise ApiError(404, f"no suggestion #{text[:20]}")
    return int(text)


async def post_vote(request: web.Request) -> web.Response:
    _, prog = programme_of(request)
    sid = _suggestion_id(request)
    try:
        s = prog.director.upvote(client_address(request), sid)
    except Refused as e:
        raise refused(e) from None
    prog.publish_queue()
    return web.json_response({"station": prog.station.id, "suggestion": s.to_json()})


async def delete_suggestion(request: web.Request) -> web.Response:
    _, prog = programme_of(request)
    require_admin(request)
    try:
        s = prog.director.remove_suggestion(_suggestion_id(request))
    except Refused as e:
        raise refused(e) from None
    prog.publish_queue()
    return web.json_response({"station": prog.station.id, "removed": s.to_json()})


async def delete_suggestions(request: web.Request) -> web.Response:
    _, prog = programme_of(request)
    require_admin(request)
    n = prog.director.clear_queue()
    prog.publish_queue()
    return web.json_response({"station": prog.station.id, "removed": n})


async def post_skip(request: web.Request) -> web.Response:
    requested_at = time.monotonic()
    _, prog = programme_of(request)
    try:
        tally = prog.director.skip(client_address(request), prog.listeners())
    except Refused as e:
        raise refused(e) from None
    done = await applied(prog.tick(requested_at)) if tally.passed else None
    prog.publish_queue()
    out: dict[str, Any] = playing_json(prog, done) if tally.passed else {"station": prog.station.id}
    out["skip"] = {"votes": tally.votes, "needed": tally.needed, "passed": tally.passed}
    return web.json_response(out)


# ---- admin: pin, schedule, clip ----------------------------------------------------------------


async def post_pin(request: web.Request) -> web.Response:
    requested_at = time.monotonic()
    radio, prog = programme_of(request)
    require_admin(request)
    data = await read_json_object(request)
    check_fields(data, ("prompt", "minutes", "transition_seconds"), ("prompt",))
    blend = parse_blend(data["prompt"], radio, admin=True)
    minutes = number_field(data, "minutes", 1, 7 * 1440)
    glide = number_field(data, "transition_seconds", 0, MAX_TRANSITION_SECONDS)
    prog.director.pin(blend, minutes, glide)
    return await _play(prog, requested_at)


async def delete_pin(request: web.Request) -> web.Response:
    requested_at = time.monotonic()
    _, prog = programme_of(request)
    require_admin(request)
    if not prog.director.unpin():
        raise ApiError(409, "nothing is pinned")
    return await _play(prog, requested_at)


def schedule_json(prog: StationProgramme) -> dict[str, Any]:
    d = prog.director
    return {
        "station": prog.station.id,
        "programme": programme_settings(d.station),
        "edited": d.edited is not None,
        "today": d.today(),
    }


async def get_schedule(request: web.Request) -> web.Response:
    _, prog = programme_of(request)
    return web.json_response(schedule_json(prog))


async def put_schedule(request: web.Request) -> web.Response:
    requested_at = time.monotonic()
    _, prog = programme_of(request)
    require_admin(request)
    data = await read_json_object(request, limit=MAX_SCHEDULE_BODY)
    if not data:
        raise ApiError(400, 'the body names no programme key (e.g. {"schedule": [...]})')
    try:
        station = with_programme(prog.director.station, data)
    except ConfigError as e:
        raise ApiError(400, str(e)) from None
    prog.director.set_station(station)
    await applied(prog.tick(requested_at))
    return web.json_response(schedule_json(prog))


async def post_clip(request: web.Request) -> web.Response:
    requested_at = time.monotonic()
    radio, prog = programme_of(request)
    require_admin(request)  # before the body is read: nobody else makes the radio read 20 MB
    query_prompt = request.query.get("prompt")
    upload = await radio.clips.read(request)
    unknown = sorted(set(upload.fields) - {"prompt"})
    if unknown:
        raise ApiError(400, f"unknown form field {unknown[0]!r} (known: prompt)")
    text = upload.fields.get("prompt", query_prompt)
    cur = prog.director.current
    assert cur is not None, "the director was started"
    blend = cur.blend if text is None else parse_blend(_text_or_json(text), radio, admin=True)
    done = await applied(prog.seed(upload.clip.tokens, blend, requested_at))
    assert done is not None, "a seed is always sent"
    return web.json_response(
        {"clip": clip_json(upload.clip), **playing_json(prog, done)}, status=202
    )


def _text_or_json(text: str) -> Any:
    """A form field or query parameter: a blend as JSON (`[{...}]`), else a plain text."""
    if text.lstrip().startswith("["):
        if json_depth(text) > 4:
            raise ApiError(400, "prompt: nested too deeply for a blend")
        try:
            return json.loads(text)
        except ValueError:
            raise ApiError(400, 'prompt: a blend must be JSON, e.g. [{"text": "jazz"}]') from None
    return text
