"""What earlier attempts of a turn already delivered, read back from the conversation stream.

A retried turn continues after what clients already have instead of starting over: the next
audio ``seq``, the byte offset into the turn's audio, whether the audio end went out, and how far
its animation got. The stream is the only truth here: an attempt that died kept nothing else, and
every entry it appended before the takeover's epoch bump is already in the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay import wire
from relay.keys import Keys
from relay.redis_conn import RedisClient
from relay.streams import read_after, read_from

_PAGE = 512


@dataclass(frozen=True)
class Delivered:
    """A turn's entries in the stream so far (all of them from its earlier attempts)."""

    start_id: str
    next_seq: int = 0  # the seq the next audio entry gets
    audio_bytes: int = 0  # bytes of the turn's audio clients already have
    audio_ended: bool = False  # the audio end marker went out
    frames: int = 0  # frames entries delivered
    frames_last: bool = False  # the frames with last=true went out: the animation is whole
    audio_only: bool = False  # an audio_only entry went out

    @property
    def motion_started(self) -> bool:
        """Clients already hold animation (or gave up on it): a new Motion Server request's
        frames must not be mixed in."""
        return self.frames > 0 or self.audio_only

    def add(self, message: wire.Message) -> Delivered:
        if message.kind == wire.AUDIO:
            return _replace(self, next_seq=int(message.get("seq", 0)) + 1,
                            audio_bytes=self.audio_bytes + len(message.get("data") or b""),
                            audio_ended=self.audio_ended or bool(message.get("end")))
        if message.kind == wire.FRAMES:
            return _replace(self, frames=self.frames + 1,
                            frames_last=self.frames_last or bool(message.get("last")))
        if message.kind == wire.AUDIO_ONLY:
            return _replace(self, audio_only=True)
        return self


def _replace(delivered: Delivered, **changes: object) -> Delivered:
    values = {**delivered.__dict__, **changes}
    return Delivered(**values)


async def read_delivered(
    client: RedisClient, keys: Keys, conversation_id: str, turn_id: str, start_id: str
) -> Delivered | None:
    """The turn's delivery so far; None when its history is incomplete (trimmed or lost), in
    which case nobody can tell which audio clients have."""
    rows = await read_from(client, keys, conversation_id, start_id, count=_PAGE)
    if not rows or rows[0][0] != start_id:
        return None
    first = wire.decode_server(wire.delivery(*rows[0]))
    if first.kind != wire.TURN_START or first.turn != turn_id:
        return None
    delivered = Delivered(start_id=start_id)
    page = rows
    rows = rows[1:]
    while rows:
        for entry_id, stored in rows:
            message = wire.decode_server(wire.delivery(entry_id, stored))
            if message.turn == turn_id:
                delivered = delivered.add(message)
        if len(page) < _PAGE:
            # The stream's end: nothing of the turn can follow, as the caller's claim fenced
            # every earlier attempt (reading on would cost a round trip to learn that).
            break
        page = rows = await read_after(client, keys, conversation_id, rows[-1][0], count=_PAGE)
    return delivered
