"""The package's error tree: one base class, a few families, each chained to its cause."""

from __future__ import annotations

import os


class RelayError(Exception):
    """Base class of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A setting is missing or invalid; raised once, at start-up."""


class ListenError(RelayError):
    """A server socket could not be opened: the port is taken, or the address is not this host's.
    Names the setting to change, since the usual cause is a second copy of the same role."""

    def __init__(self, what: str, host: str, port: int, setting: str, cause: OSError) -> None:
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        super().__init__(f"{what} cannot listen on {host}:{port}: {reason} (change {setting})")


class WireError(RelayError):
    """Bytes that do not decode as a message of the documented protocol."""


class InvalidConversationId(RelayError, ValueError):
    """A conversation id outside the documented alphabet or length."""


class TurnFenced(RelayError):
    """A write for a turn that is no longer the conversation's active turn (interrupted,
    superseded or taken over)."""


class LockHeld(RelayError):
    """A turn's opening found the lock it was to take held by another owner (named in
    ``holder``); nothing was written."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class TokenError(RelayError):
    """A client token was refused. ``close_code`` is the WebSocket close code the edge sends."""

    close_code = 4401
    reason = "invalid_token"


class TokenMissing(TokenError):
    reason = "token_missing"


class TokenExpired(TokenError):
    close_code = 4402
    reason = "token_expired"


class TokenNotYetValid(TokenError):
    """``iat`` or ``nbf`` lies further in the future than the allowed clock skew."""

    reason = "token_not_yet_valid"


class TokenWrongConversation(TokenError):
    close_code = 4403
    reason = "token_wrong_conversation"
