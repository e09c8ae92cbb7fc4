"""What an ingress connection says outside animation: ids, ServerError codes, endings."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import WSCloseCode

from relay.dev.motion_sim import proto

MAX_CLOSE_REASON_BYTES = 123  # RFC 6455 limit for a close frame's reason

# gRPC-style status codes the production server relays in ServerError.code.
INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
# No code at all: the SDK then classifies by message text. Code 3 would win over the text and
# turn "unsupported sample rate" into invalidRequest instead of unsupportedSampleRate.
TEXT_ONLY = 0

_ID_ALPHABET = string.ascii_letters + string.digits + "_-"


def new_id() -> str:
    """An id shaped like the production ones: ``YYYYMMDDHHMMSS_<12 random chars>`` (UTC)."""
    suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    return f"{datetime.now(UTC):%Y%m%d%H%M%S}_{suffix}"


def server_error(code: int, message: str, connection_id: str = "", req_id: str = "") -> bytes:
    envelope = proto.Message(type=proto.MessageType.SERVER_ERROR)
    envelope.server_error.connection_id = connection_id
    envelope.server_error.req_id = req_id
    envelope.server_error.code = code
    envelope.server_error.message = message
    payload: bytes = envelope.SerializeToString()
    return payload


def server_confirm(connection_id: str) -> bytes:
    envelope = proto.Message(type=proto.MessageType.SERVER_CONFIRM_SESSION)
    envelope.server_confirm_session.connection_id = connection_id
    payload: bytes = envelope.SerializeToString()
    return payload


def close_reason(text: str) -> bytes:
    return text.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore").encode()


@dataclass(frozen=True)
class Ending:
    """How a connection ends: an optional last ServerError, then a close frame or a TCP abort."""

    close_code: int = WSCloseCode.OK
    reason: str = ""
    error: bytes | None = None
    abort: bool = False


CLIENT_GONE = Ending()
