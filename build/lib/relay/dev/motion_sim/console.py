"""The console API: ``POST /v1/console/session-tokens`` trades an API key for a session token.

Header ``X-Api-Key``, body ``{"expireAt": <unix s>}``; 200 ``{"sessionToken": ...}``, or 400/401
with the ``{"errors": [...]}`` envelope.
"""

from __future__ import annotations

import secrets
import time
from http import HTTPStatus

import structlog
from aiohttp import web

from relay.dev.motion_sim.faults import FaultKind, is_int
from relay.dev.motion_sim.sim import SIM_KEY

log = structlog.get_logger(__name__)

MAX_TOKEN_TTL_S = 24 * 3600


def _errors_response(
    status: int, detail: str, *, code: str | None = None, title: str | None = None
) -> web.Response:
    phrase = HTTPStatus(status)
    error = {
        "id": secrets.token_hex(8),
        "status": str(status),
        "code": code or phrase.name.lower(),
        "title": title or phrase.phrase,
        "detail": detail,
    }
    return web.json_response({"errors": [error]}, status=status)


async def _read_expire_at(request: web.Request) -> int | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    value = body.get("expireAt") if isinstance(body, dict) else None
    return value if is_int(value) else None


async def handle_session_token(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    fault = sim.take_fault(frozenset({FaultKind.TOKEN_ERROR}), None)
    if fault is not None:
        return _errors_response(fault.status or 500, fault.message or "injected fault")
    if not sim.api_key_ok(request.headers.get("X-Api-Key", "")):
        # Not "Unauthorized": the SDK reads that word as a LiveKit credential problem
        # (invalidEgressConfig) before it looks at the 401 status.
        return _errors_response(
            401, "invalid API key", code="invalid_api_key", title="Authentication failed"
        )
    expire_at = await _read_expire_at(request)
    now = time.time()
    if expire_at is None:
        return _errors_response(400, "expireAt must be an integer unix timestamp")
    if not now < expire_at <= now + MAX_TOKEN_TTL_S:
        return _errors_response(400, "expireAt must be in the future and at most 24h ahead")
    token = sim.issue_token(float(expire_at))
    log.info("session token issued", expires_in_s=int(expire_at - now))
    return web.json_response({"sessionToken": token})
