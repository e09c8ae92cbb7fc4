"""Conversation-scoped client tokens: minted by the customer's backend, checked by every edge.

Format: ``v1.<payload>.<signature>``, both parts base64url without padding. The payload is JSON
``{"c": conversation_id, "iat": issued_at, "exp": expires_at}`` (unix seconds); the signature is
HMAC-SHA256 over ``v1.<payload>`` with the shared secret. Any edge holding the secret can check a
token without a Redis round trip.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from relay.errors import TokenError, TokenExpired, TokenMissing, TokenWrongConversation
from relay.keys import validate_conversation_id

_VERSION = "v1"
MAX_TTL_S = 7 * 24 * 3600
# Tolerated clock difference between the minting backend and the edges.
CLOCK_SKEW_S = 30


@dataclass(frozen=True)
class TokenClaims:
    conversation_id: str
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, signed_part: str) -> bytes:
    return hmac.new(secret.encode(), signed_part.encode(), hashlib.sha256).digest()


def mint_token(
    secret: str, conversation_id: str, *, ttl_s: int = 3600, now: float | None = None
) -> str:
    """Return a token that lets a client watch ``conversation_id`` for ``ttl_s`` seconds."""
    validate_conversation_id(conversation_id)
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be between 1 and {MAX_TTL_S}")
    issued = int(time.time() if now is None else now)
    claims = {"c": conversation_id, "iat": issued, "exp": issued + ttl_s}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signed_part = f"{_VERSION}.{payload}"
    return f"{signed_part}.{_b64(_sign(secret, signed_part))}"


def verify_token(
    secret: str, token: str | None, conversation_id: str, *, now: float | None = None
) -> TokenClaims:
    """Check signature, expiry and scope; raise a TokenError subclass that names the failure."""
    if not token:
        raise TokenMissing("no token given")
    claims = _decode_signed(secret, token)
    current = time.time() if now is None else now
    if claims.expires_at + CLOCK_SKEW_S < current:
        raise TokenExpired("token has expired")
    if claims.conversation_id != conversation_id:
        raise TokenWrongConversation("token is for another conversation")
    return claims


def _decode_signed(secret: str, token: str) -> TokenClaims:
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        raise TokenError("token is malformed")
    signed_part = f"{parts[0]}.{parts[1]}"
    try:
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError) as exc:
        raise TokenError("token signature is malformed") from exc
    if not hmac.compare_digest(signature, _sign(secret, signed_part)):
        raise TokenError("token signature does not match")
    try:
        body = json.loads(_unb64(parts[1]))
        return TokenClaims(str(body["c"]), int(body["iat"]), int(body["exp"]))
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise TokenError("token payload is malformed") from exc
