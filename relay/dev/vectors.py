"""Client test vectors: message sequences an edge can send, each with the SDK calls it must cause.

``python -m relay.dev.vectors`` writes ``relay/client/vectors/*.json`` (format in the README
there); the suite checks the checked-in files equal what this module produces, and runs the Python
and web clients against them. Frames are real wire frames from ``relay.wire`` carrying real
simulator envelopes; the expected calls are written out by hand in each scenario below, from the
protocol's rules, never computed by a client under test.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from relay import wire
from relay.dev.demo import speech_like_pcm
from relay.dev.motion_sim.animation import encode_animation, keyframes_for_audio
from relay.streams import parse_id

VECTORS_DIR = Path(__file__).resolve().parent.parent / "client" / "vectors"
FORMAT_VERSION = 1
_RATE = 16000
_BASE_MS = 1767225600000  # 2026-01-01T00:00:00Z; ids only need to look like real ones


def _bytes(data: bytes) -> dict[str, str]:
    return {"$bytes": base64.b64encode(data).decode("ascii")}


def _view(value: Any) -> Any:
    """A JSON view of a decoded message: binary values become {"$bytes": base64}."""
    if isinstance(value, bytes):
        return _bytes(value)
    if isinstance(value, dict):
        return {k: _view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_view(v) for v in value]
    return value


def audio_call(data: bytes, end: bool, returns: str | None) -> dict[str, Any]:
    return {"method": "yieldAudioData", "audio": _bytes(data), "end": end, "returns": returns}


def frames_call(frames: list[bytes], conversation_id: str) -> dict[str, Any]:
    return {"method": "yieldFramesData", "frames": [_bytes(f) for f in frames],
            "conversation_id": conversation_id}


INTERRUPT_CALL: dict[str, Any] = {"method": "interrupt"}


@dataclass
class Script:
    """Builds one vector: steps in wire order, each with the calls it must trigger."""

    name: str
    description: str
    initial_last_id: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    _ms: int = _BASE_MS
    _seq: int = 0
    _sent: dict[str, bytes] = field(default_factory=dict)

    def next_id(self, *, new_ms: bool = False) -> str:
        if new_ms:
            self._ms, self._seq = self._ms + 1, 0
        entry_id = f"{self._ms}-{self._seq}"
        self._seq += 1
        return entry_id

    def receive(self, frame: bytes, calls: list[dict[str, Any]], note: str = "") -> None:
        step: dict[str, Any] = {"receive": _bytes(frame),
                                "message": _view(msgpack.unpackb(frame, raw=False)),
                                "calls": calls}
        if note:
            step["note"] = note
        self.steps.append(step)

    def entry(self, stored: bytes, calls: list[dict[str, Any]], *, note: str = "",
              new_ms: bool = False) -> str:
        entry_id = self.next_id(new_ms=new_ms)
        frame = wire.delivery(entry_id, stored)
        self._sent[entry_id] = frame
        self.receive(frame, calls, note)
        return entry_id

    def resend(self, entry_id: str, note: str) -> None:
        """The same frame again (a reconnect race): a correct client drops it, calling nothing."""
        self.receive(self._sent[entry_id], [], note)

    def welcome(self, start: str, recovered: bool | None, position: str | None,
                calls: list[dict[str, Any]] | None = None, note: str = "") -> None:
        frame = wire.welcome(conversation="conv-1", edge="edge-a", start=start,
                             recovered=recovered, position=position)
        self.receive(frame, calls or [], note)

    def reconnect(self, last_id: str | None, note: str) -> None:
        """The connection dropped here; the client must reconnect sending this ``last_id``."""
        self.steps.append({"reconnect": {"last_id": last_id}, "note": note})

    def to_json(self) -> dict[str, Any]:
        ids = [step["message"]["id"] for step in self.steps
               if "receive" in step and "id" in step["message"]]
        ids += [self.initial_last_id] if self.initial_last_id else []
        final = max(ids, key=parse_id) if ids else None
        return {"format": FORMAT_VERSION, "protocol": wire.PROTOCOL_VERSION, "name": self.name,
                "description": self.description, "initial_last_id": self.initial_last_id,
                "steps": self.steps, "final_last_id": final}


@dataclass
class Turn:
    """Clip and envelopes of one synthetic turn: ``chunks`` audio pieces of 20 ms each."""

    turn_id: str
    chunks: list[bytes]
    envelopes: list[bytes]

    @classmethod
    def make(cls, turn_id: str, count: int, seed: int, req_id: str = "req-1") -> Turn:
        # Centred on a syllable of speech_like_pcm (its envelope is sin(4*pi*t + seed)^2), so
        # every chunk is voiced and opens the simulated mouth.
        peak = ((math.pi / 2 - seed) % (2 * math.pi)) / (4 * math.pi)
        size = 2 * _RATE // 50
        first = int((peak - 0.01 * count) * _RATE) * 2 + 2 * _RATE // 2
        clip = speech_like_pcm(first / (2 * _RATE) + 0.02 * count + 0.01, _RATE, seed=seed)
        chunks = [clip[first + i * size:first + (i + 1) * size] for i in range(count)]
        envelopes = [
            encode_animation("conn-1", req_id, end=i == count - 1,
                             keyframes=keyframes_for_audio(chunk, _RATE))
            for i, chunk in enumerate(chunks)
        ]
        return cls(turn_id, chunks, envelopes)

    def start(self) -> bytes:
        return wire.turn_start(self.turn_id, sample_rate=_RATE)

    def audio(self, i: int, *, end: bool = False, data: bytes | None = None) -> bytes:
        return wire.audio(self.turn_id, i, self.chunks[i] if data is None else data, end=end)

    def frames(self, i: int, *, last: bool = False) -> bytes:
        return wire.frames(self.turn_id, i, self.envelopes[i], last=last)


def _with_unknown_key(stored: bytes) -> bytes:
    """A stored entry with one extra key a later minor version might add: clients ignore it."""
    body = msgpack.unpackb(stored, raw=False)
    body["x_future"] = {"nested": [1, 2]}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def plain_turn() -> Script:
    s = Script("plain_turn", "One complete turn on a fresh connection: audio and frames "
               "interleaved, the id from the first yieldAudioData kept while later calls return "
               "null, an unknown key ignored.")
    t = Turn.make("turn-1", 3, seed=1)
    a0, a1, a2 = t.chunks
    f0, f1, f2 = t.envelopes
    s.welcome("live", None, None)
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(a0, False, "cid-1")])
    s.entry(t.frames(0), [frames_call([f0], "cid-1")])
    s.entry(_with_unknown_key(t.audio(1)), [audio_call(a1, False, None)],
            note="unknown key x_future is ignored")
    s.entry(t.frames(1), [frames_call([f1], "cid-1")])
    s.entry(t.audio(2, end=False), [audio_call(a2, False, None)])
    s.entry(t.audio(3, end=True, data=b""), [audio_call(b"", True, None)],
            note="the end marker may carry no audio")
    s.entry(t.frames(2, last=True), [frames_call([f2], "cid-1")], new_ms=True)
    s.entry(wire.turn_end("turn-1", status="complete"), [])
    return s


def conversation_id_changes() -> Script:
    s = Script("conversation_id_changes", "The SDK returns a new conversation id mid-turn: "
               "frames go to the latest non-null id; a null return keeps it.")
    t = Turn.make("turn-1", 3, seed=2)
    s.welcome("live", None, None)
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(t.chunks[0], False, "cid-1")])
    s.entry(t.frames(0), [frames_call([t.envelopes[0]], "cid-1")])
    s.entry(t.audio(1), [audio_call(t.chunks[1], False, "cid-2")])
    s.entry(t.audio(2, end=True), [audio_call(t.chunks[2], True, None)])
    s.entry(t.frames(1), [frames_call([t.envelopes[1]], "cid-2")])
    s.entry(t.frames(2, last=True), [frames_call([t.envelopes[2]], "cid-2")])
    s.entry(wire.turn_end("turn-1", status="complete"), [])
    return s


def mid_turn_join() -> Script:
    s = Script("mid_turn_join", "The client joins while a turn is being spoken: welcome says "
               "start=turn and delivery begins at that turn's turn_start, so the first audio "
               "precedes the first frames and ids start in the middle of the stream.")
    s._ms += 4000  # the conversation has history before the turn in progress
    t = Turn.make("turn-7", 2, seed=3)
    first = f"{s._ms}-0"
    s.welcome("turn", None, first)
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(t.chunks[0], False, "cid-1")])
    s.entry(t.frames(0), [frames_call([t.envelopes[0]], "cid-1")])
    s.entry(t.audio(1, end=True), [audio_call(t.chunks[1], True, None)])
    s.entry(t.frames(1, last=True), [frames_call([t.envelopes[1]], "cid-1")])
    s.entry(wire.turn_end("turn-7", status="complete"), [])
    return s


def resume() -> Script:
    s = Script("resume", "The connection drops mid-turn; the client reconnects (to any edge) "
               "with the id of the last message it processed and gets exactly the rest: no "
               "interrupt, the turn plays on with its conversation id.")
    t = Turn.make("turn-1", 3, seed=4)
    s.welcome("live", None, None)
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(t.chunks[0], False, "cid-1")])
    last = s.entry(t.frames(0), [frames_call([t.envelopes[0]], "cid-1")])
    s.reconnect(last, "socket lost; reconnect to the next edge with last_id")
    s.welcome("resume", True, last)
    s.entry(t.audio(1), [audio_call(t.chunks[1], False, None)])
    s.entry(t.frames(1), [frames_call([t.envelopes[1]], "cid-1")])
    s.entry(t.audio(2, end=True), [audio_call(t.chunks[2], True, None)])
    s.entry(t.frames(2, last=True), [frames_call([t.envelopes[2]], "cid-1")])
    s.entry(wire.turn_end("turn-1", status="complete"), [])
    return s


def audio_only_from_start() -> Script:
    s = Script("audio_only_from_start", "The Motion Server failed before any frames: one "
               "yieldFramesData([], cid) after the first audio, then audio only.")
    t = Turn.make("turn-1", 3, seed=5)
    s.welcome("live", None, None)
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(t.chunks[0], False, "cid-1")])
    s.entry(wire.audio_only("turn-1", reason="capacity"), [frames_call([], "cid-1")])
    s.entry(t.audio(1), [audio_call(t.chunks[1], False, None)])
    s.entry(t.audio(2, end=True), [audio_call(t.chunks[2], True, None)])
    s.entry(wire.turn_end("turn-1", status="audio_only"), [])
    return s


def audio_only_mid_turn() -> Script:
    s = Script("audio_only_mid_turn", "The Motion Server fails mid-turn: frames until then, "
               "one empty yieldFramesData, then the rest of the audio.")
    t = Turn.make("turn-1", 3, seed=6)
    s.welcome("live", None, None)
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(t.chunks[0], False, "cid-1")])
    s.entry(t.frames(0), [frames_call([t.envelopes[0]], "cid-1")])
    s.entry(t.audio(1), [audio_call(t.chunks[1], False, None)])
    s.entry(wire.audio_only("turn-1", reason="motion_error"), [frames_call([], "cid-1")])
    s.entry(t.audio(2, end=True), [audio_call(t.chunks[2], True, None)])
    s.entry(wire.turn_end("turn-1", status="audio_only"), [])
    return s


def interrupt() -> Script:
    s = Script("interrupt", "A turn is interrupted midway: interrupt() once, the id is "
               "forgotten, and the next turn starts clean with its own id.")
    t1 = Turn.make("turn-1", 3, seed=7)
    t2 = Turn.make("turn-2", 2, seed=8, req_id="req-2")
    s.welcome("live", None, None)
    s.entry(t1.start(), [])
    s.entry(t1.audio(0), [audio_call(t1.chunks[0], False, "cid-1")])
    s.entry(t1.frames(0), [frames_call([t1.envelopes[0]], "cid-1")])
    s.entry(t1.audio(1), [audio_call(t1.chunks[1], False, None)])
    s.entry(wire.interrupt("turn-1", reason="interrupted"), [INTERRUPT_CALL])
    s.entry(t2.start(), [], new_ms=True)
    s.entry(t2.audio(0), [audio_call(t2.chunks[0], False, "cid-2")])
    s.entry(t2.frames(0), [frames_call([t2.envelopes[0]], "cid-2")])
    s.entry(t2.audio(1, end=True), [audio_call(t2.chunks[1], True, None)])
    s.entry(t2.frames(1, last=True), [frames_call([t2.envelopes[1]], "cid-2")])
    s.entry(wire.turn_end("turn-2", status="complete"), [])
    return s


def producer_failover() -> Script:
    s = Script("producer_failover", "The producer speaking a turn dies after frames had "
               "arrived; another one continues it under the same turn id with seq numbers going "
               "on: audio_only(producer_failover), then the rest of the audio. Nothing special "
               "for the client beyond the audio_only rule.")
    t = Turn.make("turn-1", 4, seed=9)
    s.welcome("live", None, None)
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(t.chunks[0], False, "cid-1")])
    s.entry(t.frames(0), [frames_call([t.envelopes[0]], "cid-1")])
    s.entry(t.audio(1), [audio_call(t.chunks[1], False, None)])
    s._ms += 10_000  # about RELAY_JOB_CLAIM_IDLE_S passes before the takeover
    s.entry(wire.audio_only("turn-1", reason="producer_failover"), [frames_call([], "cid-1")],
            new_ms=True, note="another producer took the turn over")
    s.entry(t.audio(2), [audio_call(t.chunks[2], False, None)])
    s.entry(t.audio(3, end=True), [audio_call(t.chunks[3], True, None)])
    s.entry(wire.turn_end("turn-1", status="audio_only"), [])
    return s


def producer_failover_before_frames() -> Script:
    s = Script("producer_failover_before_frames", "The producer dies before any frames; the "
               "new one sends the turn's animation in full from a new request, also for audio "
               "already played. Frames go to the id the audio produced.")
    t = Turn.make("turn-1", 3, seed=10, req_id="req-2")
    s.welcome("live", None, None)
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(t.chunks[0], False, "cid-1")])
    s.entry(t.audio(1), [audio_call(t.chunks[1], False, None)])
    s._ms += 10_000
    s.entry(t.frames(0), [frames_call([t.envelopes[0]], "cid-1")], new_ms=True,
            note="another producer took the turn over")
    s.entry(t.frames(1), [frames_call([t.envelopes[1]], "cid-1")])
    s.entry(t.audio(2, end=True), [audio_call(t.chunks[2], True, None)])
    s.entry(t.frames(2, last=True), [frames_call([t.envelopes[2]], "cid-1")])
    s.entry(wire.turn_end("turn-1", status="complete"), [])
    return s


def recovered_false() -> Script:
    s = Script("recovered_false", "The client reconnects with a last_id the edge can no longer "
               "honour (history trimmed or lost): welcome has recovered=false, the client resets "
               "the player with interrupt() and forgets its id, then plays on from the next "
               "turn's turn_start.")
    t1 = Turn.make("turn-1", 3, seed=11)
    t2 = Turn.make("turn-2", 2, seed=12, req_id="req-2")
    s.welcome("live", None, None)
    s.entry(t1.start(), [])
    s.entry(t1.audio(0), [audio_call(t1.chunks[0], False, "cid-1")])
    last = s.entry(t1.frames(0), [frames_call([t1.envelopes[0]], "cid-1")])
    s.reconnect(last, "offline for a long time; reconnect with last_id")
    s._ms += 3_600_000
    position = s.next_id(new_ms=True)
    s._seq -= 1  # the position is the next entry's id: the turn_start below
    s.welcome("turn", False, position, [INTERRUPT_CALL],
              note="messages between last_id and position are lost")
    s.entry(t2.start(), [])
    s.entry(t2.audio(0), [audio_call(t2.chunks[0], False, "cid-2")])
    s.entry(t2.frames(0), [frames_call([t2.envelopes[0]], "cid-2")])
    s.entry(t2.audio(1, end=True), [audio_call(t2.chunks[1], True, None)])
    s.entry(t2.frames(1, last=True), [frames_call([t2.envelopes[1]], "cid-2")])
    s.entry(wire.turn_end("turn-2", status="complete"), [])
    return s


def duplicates_after_reconnect_race() -> Script:
    s = Script("duplicates_after_reconnect_race", "Two connections overlap after a reconnect "
               "and messages already processed arrive again: each is dropped (ids compared as "
               "(ms, seq) integers, so 9 < 10 within one millisecond), nothing is called twice.")
    t = Turn.make("turn-1", 6, seed=13)
    s.welcome("live", None, None)
    s._seq = 7  # ids ...-7 to ...-12 in one millisecond: "-10" sorts before "-9" as text
    s.entry(t.start(), [])
    s.entry(t.audio(0), [audio_call(t.chunks[0], False, "cid-1")])
    a = s.entry(t.frames(0), [frames_call([t.envelopes[0]], "cid-1")])
    b = s.entry(t.audio(1), [audio_call(t.chunks[1], False, None)])
    c = s.entry(t.audio(2), [audio_call(t.chunks[2], False, None)])
    s.reconnect(c, "socket lost; reconnect with last_id")
    s.welcome("resume", True, c)
    s.resend(a, "already processed: drop")
    s.resend(b, "already processed: drop")
    s.resend(c, "already processed: drop (equal to last_id)")
    s.entry(t.frames(1), [frames_call([t.envelopes[1]], "cid-1")])
    s.resend(b, "an older duplicate after newer messages: drop")
    s.entry(t.audio(3, end=True), [audio_call(t.chunks[3], True, None)])
    s.entry(t.frames(2, last=True), [frames_call([t.envelopes[2]], "cid-1")])
    s.entry(wire.turn_end("turn-1", status="complete"), [])
    return s


def stored_position() -> Script:
    s = Script("stored_position", "A client that stored its position starts with last_id "
               "(for example after a page reload): messages at or below it are dropped.")
    t = Turn.make("turn-1", 2, seed=14)
    s._ms += 1
    s.initial_last_id = f"{s._ms}-2"
    s.welcome("resume", True, s.initial_last_id)
    s._seq = 1
    s.entry(t.audio(0), [], note="at or below the stored position: drop")
    s.entry(t.frames(0), [], note="equal to the stored position: drop")
    s.entry(t.audio(1, end=True), [audio_call(t.chunks[1], True, "cid-1")])
    s.entry(t.frames(1, last=True), [frames_call([t.envelopes[1]], "cid-1")])
    s.entry(wire.turn_end("turn-1", status="complete"), [])
    return s


SCENARIOS = (plain_turn, conversation_id_changes, mid_turn_join, resume, audio_only_from_start,
             audio_only_mid_turn, interrupt, producer_failover, producer_failover_before_frames,
             recovered_false, duplicates_after_reconnect_race, stored_position)


def render_all() -> dict[str, str]:
    """File name -> exact file text, for every scenario."""
    return {f"{build.__name__}.json": json.dumps(build().to_json(), indent=1) + "\n"
            for build in SCENARIOS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=VECTORS_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (args.out / name).write_text(text)
    print(f"wrote {len(SCENARIOS)} vectors to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
