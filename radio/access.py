"""Who is asking: the admin token and the client's address (`security.*`, `server.*`)."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from radio.middleware import ApiError
from radio.service import RADIO


def is_admin(request: web.Request) -> bool:
    """True with a correct `Authorization: Bearer <token>`; ApiError 403 with a wrong one.

    The header may hold any bytes (aiohttp hands over what is not UTF-8 as surrogates): the
    token is compared as the bytes that were sent, through SHA-256 so that neither its content
    nor its length shows in the time taken."""
    token = request.app[RADIO].config.security.admin_token
    header = request.headers.get("Authorization", "")
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(
            401, "Authorization must be 'Bearer <token>'", {"WWW-Authenticate": "Bearer"}
        )
    sent = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    if not token or not hmac.compare_digest(sent, hashlib.sha256(token.encode()).digest()):
        raise ApiError(403, "wrong admin token")
    return True


def require_admin(request: web.Request) -> None:
    if not request.app[RADIO].config.security.admin_token:
        raise ApiError(403, "admin actions are disabled (security.admin_token is not set)")
    if not is_admin(request):
        raise ApiError(401, "admin token required", {"WWW-Authenticate": "Bearer"})


def client_address(request: web.Request) -> str:
    """The client's address: the peer, or the first X-Forwarded-For hop when
    `server.trust_forwarded` (the radio sits behind the operator's own reverse proxy)."""
    if request.app[RADIO].config.server.trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.remote or "?"
