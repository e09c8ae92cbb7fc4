"""Fault rules the test control API arms to make the simulator misbehave on purpose.

Rules (``FaultRule``; JSON keys as the field names) fire in the order they were added.
Common keys: ``times`` (fires this many times, default 1, -1 = forever), ``avatar_id``
(only sessions for that avatar), ``after_keyframes`` (runtime kinds only: fire at the first
animation boundary once the session has sent this many keyframes, default 0 = before the first).
  ``token_error``       the token POST answers ``status`` (default 500) with an errors envelope
                        whose detail is ``message``. Cannot be filtered by avatar.
  ``reject_upgrade``    the WebSocket upgrade is refused with HTTP ``status`` (default 400) and
                        body ``{"message": message}`` (default "Invalid session token").
  ``handshake_silence`` the ClientConfigureSession is never answered (the SDK times out).
  ``server_error``      a ServerError{``code`` (default 13), ``message`` (default "driven server
                        request failed")} for the request being streamed, which then stops.
  ``drop``              the TCP connection is aborted without a close frame.
  ``close``             the session closes with ``code`` (default 4503) and reason ``message``.
  ``stall``             the session sends no more animation but stays open.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any


class FaultKind(StrEnum):
    TOKEN_ERROR = "token_error"
    REJECT_UPGRADE = "reject_upgrade"
    HANDSHAKE_SILENCE = "handshake_silence"
    SERVER_ERROR = "server_error"
    DROP = "drop"
    CLOSE = "close"
    STALL = "stall"


# Kinds that fire inside a running session, at an animation boundary.
RUNTIME_FAULTS = frozenset(
    {FaultKind.SERVER_ERROR, FaultKind.DROP, FaultKind.CLOSE, FaultKind.STALL}
)


@dataclass(frozen=True)
class FaultRule:
    kind: FaultKind
    avatar_id: str | None = None
    after_keyframes: int = 0
    times: int = 1
    code: int | None = None
    message: str | None = None
    status: int | None = None

    def __post_init__(self) -> None:
        if self.times == 0 or self.times < -1:
            raise ValueError("times must be positive or -1 (forever)")
        if self.after_keyframes < 0:
            raise ValueError("after_keyframes must not be negative")
        if self.after_keyframes and self.kind not in RUNTIME_FAULTS:
            raise ValueError("after_keyframes only applies to runtime faults")
        if self.kind is FaultKind.TOKEN_ERROR and self.avatar_id is not None:
            raise ValueError("token_error cannot be filtered by avatar_id")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("status must be an HTTP error status")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultRule:
        """Build a rule from decoded JSON; raises ValueError on unknown keys or bad values."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        kind = data.get("kind")
        if not isinstance(kind, str):
            raise ValueError("kind must be a string")
        kwargs = {**data, "kind": FaultKind(kind)}
        for key in ("after_keyframes", "times", "code", "status"):
            if key in kwargs and kwargs[key] is not None and not is_int(kwargs[key]):
                raise ValueError(f"{key} must be an integer")
        for key in ("avatar_id", "message"):
            if key in kwargs and kwargs[key] is not None and not isinstance(kwargs[key], str):
                raise ValueError(f"{key} must be a string")
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def is_int(value: object) -> bool:
    """A JSON integer: bool subclasses int in Python but is not a number in JSON."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ArmedFault:
    rule: FaultRule
    remaining: int  # -1 = forever

    def matches(self, kinds: frozenset[FaultKind], avatar_id: str | None, keyframes: int) -> bool:
        rule = self.rule
        return (
            rule.kind in kinds
            and rule.avatar_id in (None, avatar_id)
            and keyframes >= rule.after_keyframes
        )
