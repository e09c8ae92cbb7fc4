"""The only module that encodes and decodes the client wire format (see docs/protocol.md).

Messages are msgpack maps with string keys. Every message carries ``v`` (protocol version) and
``kind``. Messages that come from a conversation stream also carry ``id``, the stream position a
client sends back to resume, and ``turn``.

A stream entry stores the message body without ``v`` and ``id`` (the id is the entry's own id,
known only after the append). The edge turns an entry into a client frame by splicing those two
pairs in front of the stored pairs, so the hot path never decodes or re-encodes audio or frames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from relay.errors import WireError

# msgpack ships no annotations; this alias gives packb its real return type at no call cost.
_packb: Callable[..., bytes] = msgpack.packb

PROTOCOL_VERSION = 1

# Kinds stored in conversation streams, in the order a turn produces them.
TURN_START = "turn_start"
AUDIO = "audio"
FRAMES = "frames"
AUDIO_ONLY = "audio_only"
INTERRUPT = "interrupt"
TURN_END = "turn_end"
STREAM_KINDS = frozenset({TURN_START, AUDIO, FRAMES, AUDIO_ONLY, INTERRUPT, TURN_END})

# Kinds the edge itself sends; they have no stream position.
WELCOME = "welcome"
ERROR = "error"
PONG = "pong"
EDGE_KINDS = frozenset({WELCOME, ERROR, PONG})

# Kinds a client may send to the edge.
PING = "ping"
CLIENT_KINDS = frozenset({PING})

# Turn end statuses.
STATUS_COMPLETE = "complete"
STATUS_AUDIO_ONLY = "audio_only"
STATUS_INTERRUPTED = "interrupted"

# A fixmap header holds up to 15 pairs; stored bodies keep two free for ``v`` and ``id``.
_MAX_STORED_PAIRS = 13
_FIXMAP = 0x80

_V_PAIR = msgpack.packb("v") + msgpack.packb(PROTOCOL_VERSION)
_ID_KEY = msgpack.packb("id")
# Per stored pair count: the client message's map header, then ``v``, then the ``id`` key.
_DELIVERY_HEADS: tuple[bytes, ...] = tuple(bytes((_FIXMAP | (pairs + 2),)) + _V_PAIR + _ID_KEY
                        for pairs in range(_MAX_STORED_PAIRS + 1))


@dataclass(frozen=True)
class Message:
    """A decoded server-to-client message."""

    kind: str
    id: str | None = None
    turn: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def _pack(body: dict[str, Any]) -> bytes:
    try:
        return _packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode {body.get('kind')!r} message") from exc


def _entry(kind: str, turn: str, **fields: Any) -> bytes:
    body = {"kind": kind, "turn": turn, **fields}
    if len(body) > _MAX_STORED_PAIRS:
        raise WireError("stored message has too many fields")
    return _pack(body)


# --- stream entries (written by producers) -------------------------------------------------------


def turn_start(turn: str, *, sample_rate: int, audio_format: str = "pcm_s16le") -> bytes:
    return _entry(TURN_START, turn, sample_rate=sample_rate, format=audio_format, channels=1)


def audio(turn: str, seq: int, data: bytes, *, end: bool) -> bytes:
    return _entry(AUDIO, turn, seq=seq, data=bytes(data), end=end)


def audio_run(turn: str, chunks: Sequence[bytes], *, end: bool) -> list[bytes]:
    """A turn's first audio entries: seq 0, 1, ... for ``chunks``, the last one ending the
    turn's audio when ``end`` (what a turn's opening write carries, whoever makes it)."""
    last = len(chunks) - 1
    return [audio(turn, seq, chunk, end=end and seq == last) for seq, chunk in enumerate(chunks)]


def frames(turn: str, seq: int, envelope: bytes, *, last: bool) -> bytes:
    if not envelope:
        # An empty frames message would switch the client SDK to audio-only mode; that is what
        # audio_only() is for, so refuse it here rather than by accident.
        raise WireError("frames message needs a non-empty envelope")
    return _entry(FRAMES, turn, seq=seq, data=bytes(envelope), last=last)


def audio_only(turn: str, *, reason: str) -> bytes:
    return _entry(AUDIO_ONLY, turn, reason=reason)


def interrupt(turn: str, *, reason: str) -> bytes:
    return _entry(INTERRUPT, turn, reason=reason)


def turn_end(turn: str, *, status: str) -> bytes:
    return _entry(TURN_END, turn, status=status)


def delivery(entry_id: str | bytes, stored: bytes) -> bytes:
    """Client message for a stream entry: ``v`` and ``id`` spliced in front of the stored pairs."""
    if not stored:
        raise WireError("stored entry is not a msgpack fixmap")
    raw_id = entry_id.encode("ascii") if isinstance(entry_id, str) else entry_id
    return delivery_head(raw_id, stored[0]) + stored[1:]


def delivery_head(entry_id: bytes, first_byte: int) -> bytes:
    """What replaces a stored entry's first byte (its fixmap header) to make the client message.

    The edge's hot path joins this, the WebSocket header and the stored entry after its first
    byte in one copy; the stored pairs are never decoded or re-encoded.
    """
    if first_byte & 0xF0 != _FIXMAP:
        raise WireError("stored entry is not a msgpack fixmap")
    return _DELIVERY_HEADS[first_byte & 0x0F] + _pack_ascii(entry_id)


def _pack_ascii(text: bytes) -> bytes:
    # A stream id is short ASCII: its msgpack str encoding is a length byte and the bytes, built
    # here without decoding the id to a Python str for msgpack.packb.
    if len(text) < 32:
        return bytes((0xA0 | len(text),)) + text
    if len(text) < 256:
        return bytes((0xD9, len(text))) + text
    raise WireError("stream id too long")


def write_mark(stored: bytes) -> str:
    """What makes a stored entry unique within its turn, for the append script's duplicate check
    (``relay.streams``): ``a<seq>`` for audio, ``f<seq>`` for frames, ``o`` for the one
    ``audio_only``, ``e`` for ``turn_end``, ``i`` for ``interrupt``, ``s`` for ``turn_start``."""
    body = _unpack_map(stored)
    kind = body.get("kind")
    if kind in (AUDIO, FRAMES):
        seq = body.get("seq")
        if not isinstance(seq, int) or seq < 0:
            raise WireError(f"{kind} entry without a valid seq")
        return f"{'a' if kind == AUDIO else 'f'}{seq}"
    marks = {AUDIO_ONLY: "o", TURN_END: "e", INTERRUPT: "i", TURN_START: "s"}
    if kind not in marks:
        raise WireError(f"unknown stored kind {kind!r}")
    return marks[str(kind)]


def stored_kind(stored: bytes) -> tuple[str, str | None]:
    """Kind and turn of a stored entry (decodes the whole entry; used off the hot path)."""
    body = _unpack_map(stored)
    return str(body.get("kind")), body.get("turn")


# --- edge messages --------------------------------------------------------------------------------


def edge_message(kind: str, **fields: Any) -> bytes:
    if kind not in EDGE_KINDS:
        raise WireError(f"unknown edge message kind {kind!r}")
    return _pack({"v": PROTOCOL_VERSION, "kind": kind, **fields})


def welcome(
    *, conversation: str, edge: str, start: str, recovered: bool | None, position: str | None
) -> bytes:
    return edge_message(
        WELCOME,
        conversation=conversation,
        edge=edge,
        start=start,
        recovered=recovered,
        position=position,
    )


def error(code: str, message: str) -> bytes:
    return edge_message(ERROR, code=code, message=message)


# --- client messages ------------------------------------------------------------------------------


def ping(nonce: int | None = None) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "kind": PING, "nonce": nonce})


def pong(nonce: Any) -> bytes:
    return edge_message(PONG, nonce=nonce)


@dataclass(frozen=True)
class ClientMessage:
    kind: str
    fields: dict[str, Any]


def decode_client(data: bytes, *, max_bytes: int) -> ClientMessage:
    """Decode and validate a client-to-edge message; every failure is a WireError with a reason."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    body = _unpack_map(data)
    if body.get("v") != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {body.get('v')!r}")
    kind = body.get("kind")
    if kind not in CLIENT_KINDS:
        raise WireError(f"unknown message kind {kind!r}")
    return ClientMessage(kind=str(kind), fields=body)


def decode_server(data: bytes) -> Message:
    """Decode a server-to-client message (used by the Python client and tests)."""
    body = _unpack_map(data)
    if body.get("v") != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {body.get('v')!r}")
    kind = body.pop("kind", None)
    if kind not in STREAM_KINDS and kind not in EDGE_KINDS:
        raise WireError(f"unknown message kind {kind!r}")
    body.pop("v")
    entry_id, turn = body.pop("id", None), body.pop("turn", None)
    return Message(kind=str(kind), id=entry_id, turn=turn, fields=body)


def _unpack_map(data: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as exc:  # msgpack raises ValueError subclasses
        raise WireError("message is not valid msgpack") from exc
    if not isinstance(body, dict):
        raise WireError("message is not a msgpack map")
    return body


class CloseCode:
    """WebSocket close codes the edge uses (docs/protocol.md). ``RESUMABLE`` ones mean: reconnect,
    to this or any edge, with your last position."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    EDGE_RESTARTING = 1012
    BAD_REQUEST = 4400
    TOKEN_INVALID = 4401
    TOKEN_EXPIRED = 4402
    TOKEN_WRONG_CONVERSATION = 4403
    SLOW_CONSUMER = 4429
    TOO_MANY_CONNECTIONS = 4430
    UNAVAILABLE = 4503

    RESUMABLE = frozenset({GOING_AWAY, INTERNAL_ERROR, EDGE_RESTARTING, SLOW_CONSUMER, UNAVAILABLE,
                           TOO_MANY_CONNECTIONS})
    # A client should stop and surface these; reconnecting with the same token cannot succeed.
    # (4401 and 4402 can be cured by a new token: clients with a token callback fetch one.)
    FATAL = frozenset({PROTOCOL_ERROR, BAD_REQUEST, TOKEN_INVALID, TOKEN_EXPIRED,
                       TOKEN_WRONG_CONVERSATION, TOO_BIG})
    REFRESH_TOKEN = frozenset({TOKEN_INVALID, TOKEN_EXPIRED})
