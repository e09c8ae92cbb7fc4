"""``relay watch <conversation>``: one conversation's stream on a terminal, as it happens.

For the developer debugging an integration: every message on one line (its time, stream id,
turn, kind, seq, size and what else it says), a summary when a turn ends, and a warning line for
what a client would trip over: a gap in a turn's audio or frames seq, a message of a turn that
was never started, audio after the end marker, a long silence inside a turn.

Two sources: the conversation's stream read straight from Redis (``REDIS_URL``; what producers
wrote), or ``--edge`` to watch through an edge as a client sees it (a token is minted with this
deployment's keys unless ``--token`` is given). The view itself (``WatchView``) only formats
messages, so both sources print the same.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from relay import wire
from relay.keys import Keys
from relay.redis_conn import client_for
from relay.settings import Settings
from relay.streams import parse_id

SILENCE_WARN_MS = 500  # a gap this long between two messages of a turn gets its own line
_READ_COUNT = 512
_BLOCK_MS = 1000


@dataclass
class _TurnTally:
    started_ms: int
    audio: int = 0
    audio_bytes: int = 0
    frames: int = 0
    next_audio_seq: int = 0
    next_frames_seq: int = 0
    audio_ended: bool = False
    last_ms: int = 0


@dataclass
class WatchView:
    """Turns delivered messages into terminal lines. ``feed`` returns the lines for one message."""

    show_now: Callable[[], float] = time.time
    turns: dict[str, _TurnTally] = field(default_factory=dict)
    seen: int = 0

    def feed(self, message: wire.Message) -> list[str]:
        if message.kind in wire.EDGE_KINDS:
            return [self._edge_line(message)]
        self.seen += 1
        at_ms = parse_id(message.id)[0] if message.id else 0
        turn_id = message.turn or "?"
        lines = [self._line(message, at_ms)]
        lines += self._check(message, turn_id, at_ms)
        return lines

    # --- one line per message ---------------------------------------------------------------

    def _line(self, message: wire.Message, at_ms: int) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(at_ms / 1000)) + f".{at_ms % 1000:03d}"
        lag_ms = max(0, int(self.show_now() * 1000) - at_ms)
        data = message.get("data")
        size = f"{len(data):>6} B" if isinstance(data, bytes | bytearray) else " " * 8
        seq = message.get("seq")
        seq_text = f"#{seq:<5}" if isinstance(seq, int) else " " * 6
        return (f"{clock}  {message.id or '-':<18} {_short(message.turn):<10} "
                f"{message.kind:<10} {seq_text} {size}  {_details(message)}"
                f"{f'  (lag {lag_ms} ms)' if lag_ms >= 1000 else ''}").rstrip()

    def _edge_line(self, message: wire.Message) -> str:
        fields = " ".join(f"{k}={v}" for k, v in sorted(message.fields.items()) if k != "v")
        return f"-- edge {message.kind}: {fields}"

    # --- what a client would trip over --------------------------------------------------------

    def _check(self, message: wire.Message, turn_id: str, at_ms: int) -> list[str]:
        if message.kind == wire.TURN_START:
            previous = self.turns.get(turn_id)
            self.turns[turn_id] = _TurnTally(started_ms=at_ms, last_ms=at_ms)
            return ["!! turn_start again for a turn already started"] if previous else []
        tally = self.turns.get(turn_id)
        if tally is None:
            # Joined mid-turn, or its start was trimmed: say it once and follow it from here.
            self.turns[turn_id] = tally = _TurnTally(started_ms=at_ms, last_ms=at_ms)
            tally.next_audio_seq = _int(message.get("seq")) if message.kind == wire.AUDIO else 0
            tally.next_frames_seq = _int(message.get("seq")) if message.kind == wire.FRAMES else 0
            warnings = [f"!! {message.kind} of turn {_short(turn_id)} without its turn_start "
                        "(joined mid-turn, or the start was trimmed)"]
        else:
            warnings = []
        if at_ms - tally.last_ms >= SILENCE_WARN_MS:
            warnings.append(f"!! {at_ms - tally.last_ms} ms of silence inside the turn")
        tally.last_ms = max(tally.last_ms, at_ms)
        if message.kind == wire.AUDIO:
            warnings += self._audio(message, tally)
        elif message.kind == wire.FRAMES:
            warnings += self._frames(message, tally)
        elif message.kind in (wire.TURN_END, wire.INTERRUPT):
            warnings.append(self._summary(message, turn_id, tally, at_ms))
            if message.kind == wire.TURN_END:
                del self.turns[turn_id]
        return warnings

    def _audio(self, message: wire.Message, tally: _TurnTally) -> list[str]:
        seq, out = _int(message.get("seq")), []
        if tally.audio_ended:
            out.append("!! audio after the turn's end marker")
        if seq != tally.next_audio_seq:
            out.append(f"!! audio seq gap: expected #{tally.next_audio_seq}, got #{seq}")
        tally.next_audio_seq = seq + 1
        tally.audio += 1
        data = message.get("data")
        tally.audio_bytes += len(data) if isinstance(data, bytes | bytearray) else 0
        tally.audio_ended = tally.audio_ended or bool(message.get("end"))
        return out

    def _frames(self, message: wire.Message, tally: _TurnTally) -> list[str]:
        seq, out = _int(message.get("seq")), []
        if seq != tally.next_frames_seq:
            out.append(f"!! frames seq gap: expected #{tally.next_frames_seq}, got #{seq}")
        tally.next_frames_seq = seq + 1
        tally.frames += 1
        return out

    def _summary(self, message: wire.Message, turn_id: str, tally: _TurnTally,
                 at_ms: int) -> str:
        how = message.get("status") if message.kind == wire.TURN_END else (
            f"interrupted ({message.get('reason')})")
        return (f"== turn {_short(turn_id)} {how}: {tally.audio} audio "
                f"({tally.audio_bytes} B), {tally.frames} frames, {at_ms - tally.started_ms} ms")


def _details(message: wire.Message) -> str:
    kind = message.kind
    if kind == wire.TURN_START:
        return f"rate={message.get('sample_rate')} format={message.get('format')}"
    if kind == wire.AUDIO:
        return "end" if message.get("end") else ""
    if kind == wire.FRAMES:
        return "last" if message.get("last") else ""
    if kind in (wire.AUDIO_ONLY, wire.INTERRUPT):
        return f"reason={message.get('reason')}"
    if kind == wire.TURN_END:
        return f"status={message.get('status')}"
    return ""


def _short(turn_id: str | None) -> str:
    return "-" if not turn_id else turn_id if len(turn_id) <= 10 else turn_id[:9] + "…"


def _int(value: Any) -> int:
    return value if isinstance(value, int) else -1


# --- sources ---------------------------------------------------------------------------------


async def from_stream(settings: Settings, conversation_id: str, *, start: str,
                      ) -> AsyncIterator[wire.Message]:
    """Entries of the stream after ``start`` ("0-0": all retained; "$": new ones only), decoded
    exactly as an edge delivers them."""
    client = client_for(settings, block_ms=_BLOCK_MS)
    key = Keys.of(settings).stream(conversation_id)
    try:
        position = start
        if position == "$":
            last = await client.xrevrange(key, count=1)
            position = last[0][0].decode() if last else "0-0"
        while True:
            reply = await client.xread({key: position}, count=_READ_COUNT, block=_BLOCK_MS)
            for _, entries in reply or ():
                for raw_id, fields in entries:
                    position = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                    yield wire.decode_server(wire.delivery(position, fields[b"d"]))
    finally:
        await client.aclose()


async def from_edge(settings: Settings, conversation_id: str, *, edge: str,
                    token: str | None) -> AsyncIterator[wire.Message]:
    """What a new client of ``edge`` receives: from the active turn's start, or live, and on
    through reconnects (the welcome of each connection is shown too)."""
    from relay.client import RelayClient
    from relay.tokens import mint_with_settings

    client = RelayClient(edge, conversation_id,
                         token or (lambda: mint_with_settings(settings, conversation_id)))
    try:
        async for message in client.messages():
            yield message
    finally:
        await client.close()


async def watch(messages: AsyncIterator[wire.Message], *, out: TextIO = sys.stdout,
                max_turns: int | None = None, view: WatchView | None = None) -> int:
    """Print ``messages`` until the source ends or ``max_turns`` turns have ended; returns the
    number of warning lines printed."""
    view = view or WatchView()
    ended = warnings = 0
    async for message in messages:
        for line in view.feed(message):
            warnings += line.startswith("!!")
            print(line, file=out, flush=True)
        if message.kind == wire.TURN_END:
            ended += 1
            if max_turns is not None and ended >= max_turns:
                break
    return warnings


async def run_watch(settings: Settings, conversation_id: str, *, edge: str | None,
                    token: str | None, from_start: bool, max_turns: int | None) -> int:
    source: AsyncIterator[wire.Message]
    if edge:
        source = from_edge(settings, conversation_id, edge=edge, token=token)
    else:
        source = from_stream(settings, conversation_id, start="0-0" if from_start else "$")
    print(f"watching {conversation_id} "
          f"({'through ' + edge if edge else 'from the stream'}; Ctrl-C stops)", flush=True)
    try:
        await watch(source, max_turns=max_turns)
    except asyncio.CancelledError:
        pass
    return 0
