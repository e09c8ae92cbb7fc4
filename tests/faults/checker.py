"""The independent check: every client's record against the streams and the submitted clips.

For each client it counts
- duplicated: a stream id received more than once;
- reordered: a stream id received after a later one;
- lost: an entry of the stream, after the client's first delivery, it never received, unless a
  ``welcome{recovered: false}`` announced a gap covering it;
- corrupt: a received entry whose content differs from the stream's (or any snapshot's);
- bad turns: a turn played whole (no announced gap inside it) that is not its clip byte for byte,
  once, in seq order, with a single start and end, and no frames before its first audio; turns
  out of submit order or interleaved.
Announced gaps are allowed only in scenarios where Redis itself may lose data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from relay import wire
from relay.streams import parse_id
from tests.faults.clients import Record


@dataclass
class Verdict:
    clients: int = 0
    messages: int = 0
    duplicated: int = 0
    reordered: int = 0
    lost: int = 0
    corrupt: int = 0
    bad_turns: int = 0
    announced_gaps: int = 0
    whole_turns: int = 0  # client-turns checked byte for byte
    problems: list[str] = field(default_factory=list)

    def ok(self, *, loss_allowed: bool) -> bool:
        return not (self.duplicated or self.reordered or self.lost or self.corrupt
                    or self.bad_turns or (self.announced_gaps and not loss_allowed))

    def note(self, text: str) -> None:
        if len(self.problems) < 40:
            self.problems.append(text)


def turn_outcomes(truth: dict[str, list[tuple[str, bytes]]], order: dict[str, list[str]],
                  dead: set[str]) -> Counter[str]:
    """Each submitted turn's outcome as the streams tell it."""
    ends: dict[str, str] = {}
    for rows in truth.values():
        for _, stored in rows:
            message = wire.decode_server(wire.delivery("0-1", stored))
            if message.kind == wire.TURN_END:
                ends[message.turn or ""] = str(message.get("status"))
            elif message.kind == wire.INTERRUPT and message.turn not in ends:
                ends[message.turn or ""] = f"interrupted:{message.get('reason')}"
    outcomes: Counter[str] = Counter()
    for turns in order.values():
        for turn_id in turns:
            outcomes[ends.get(turn_id) or ("dead_letter" if turn_id in dead else "missing")] += 1
    return outcomes


def check(records: list[Record], truth: dict[str, list[tuple[str, bytes]]],
          snapshots: dict[str, dict[str, bytes]], clips: dict[str, bytes],
          order: dict[str, list[str]]) -> Verdict:
    verdict = Verdict()
    for record in records:
        verdict.clients += 1
        rows = truth.get(record.conversation_id, [])
        known = {**snapshots.get(record.conversation_id, {}), **dict(rows)}
        _check_record(verdict, record, rows, known, clips, order.get(record.conversation_id, []))
    return verdict


def _check_record(verdict: Verdict, record: Record, rows: list[tuple[str, bytes]],
                  known: dict[str, bytes], clips: dict[str, bytes], order: list[str]) -> None:
    who = f"{record.conversation_id}{' (slow)' if record.slow else ''}"
    received: list[wire.Message] = []
    gaps: list[tuple[tuple[int, int], tuple[int, int] | None]] = []  # (after, up to) announced
    seen: set[str] = set()
    high = (0, 0)
    gap_open: tuple[int, int] | None = None
    for event in record.events:
        if event.kind == "welcome" and event.message is not None:
            if event.message.get("recovered") is False:
                verdict.announced_gaps += 1
                gap_open = high
            continue
        if event.kind != "message" or event.message is None:
            continue
        message = event.message
        entry = message.id or ""
        parsed = parse_id(entry)
        verdict.messages += 1
        if entry in seen:
            verdict.duplicated += 1
            verdict.note(f"{who}: {entry} received twice")
            continue
        if parsed < high:
            verdict.reordered += 1
            verdict.note(f"{who}: {entry} after a later entry")
        seen.add(entry)
        if gap_open is not None:
            gaps.append((gap_open, parsed))
            gap_open = None
        high = max(high, parsed)
        stored = known.get(entry)
        if stored is not None and wire.decode_server(wire.delivery(entry, stored)) != message:
            verdict.corrupt += 1
            verdict.note(f"{who}: {entry} differs from the stream")
        received.append(message)
    if gap_open is not None:
        gaps.append((gap_open, None))
    _count_lost(verdict, who, received, rows, seen, gaps)
    _check_turns(verdict, who, received, clips, order, gaps)


def _count_lost(verdict: Verdict, who: str, received: list[wire.Message],
                rows: list[tuple[str, bytes]], seen: set[str],
                gaps: list[tuple[tuple[int, int], tuple[int, int] | None]]) -> None:
    if not received:
        return
    first = parse_id(received[0].id or "0-0")
    for entry, _ in rows:
        parsed = parse_id(entry)
        if parsed <= first or entry in seen:
            continue
        if any(after < parsed and (upto is None or parsed < upto) for after, upto in gaps):
            continue
        verdict.lost += 1
        verdict.note(f"{who}: {entry} never received")


def _check_turns(verdict: Verdict, who: str, received: list[wire.Message],
                 clips: dict[str, bytes], order: list[str],
                 gaps: list[tuple[tuple[int, int], tuple[int, int] | None]]) -> None:
    by_turn: dict[str, list[wire.Message]] = {}
    sequence: list[str] = []
    for message in received:
        turn = message.turn or ""
        if turn not in by_turn:
            sequence.append(turn)
        elif sequence[-1] != turn and not _gap_between(gaps, by_turn[turn][-1], message):
            verdict.bad_turns += 1
            verdict.note(f"{who}: turn {turn} interleaved with another")
        by_turn.setdefault(turn, []).append(message)
    positions = [order.index(t) for t in sequence if t in order]
    if positions != sorted(positions):
        verdict.bad_turns += 1
        verdict.note(f"{who}: turns out of submit order {sequence}")
    for turn, mine in by_turn.items():
        if turn not in clips:
            continue
        first, last = parse_id(mine[0].id or "0-0"), parse_id(mine[-1].id or "0-0")
        unended = mine[-1].kind not in (wire.TURN_END, wire.INTERRUPT)
        if any(first <= after and (upto is None or after < last or (after == last and unended))
               for after, upto in gaps):
            # A gap was announced inside this turn, or right after the last of it the client
            # got (Redis lost the rest of it): it cannot be whole for this client.
            continue
        if mine[0].kind != wire.TURN_START:
            if not any(upto is not None and upto == first for _, upto in gaps):
                verdict.bad_turns += 1
                verdict.note(f"{who}: turn {turn} began with {mine[0].kind}, not turn_start")
            continue
        problem = _turn_problem(mine, clips[turn])
        verdict.whole_turns += 1
        if problem:
            verdict.bad_turns += 1
            verdict.note(f"{who}: turn {turn}: {problem}")


def _gap_between(gaps: list[tuple[tuple[int, int], tuple[int, int] | None]],
                 before: wire.Message, after: wire.Message) -> bool:
    a, b = parse_id(before.id or "0-0"), parse_id(after.id or "0-0")
    return any(a <= start and (upto is None or upto <= b) for start, upto in gaps)


def _turn_problem(mine: list[wire.Message], clip: bytes) -> str | None:
    kinds = [m.kind for m in mine]
    audio = [m for m in mine if m.kind == wire.AUDIO]
    frames = [m for m in mine if m.kind == wire.FRAMES]
    if kinds.count(wire.TURN_START) != 1:
        return "turn_start not exactly once"
    if [m.get("seq") for m in audio] != list(range(len(audio))):
        return f"audio seqs {[m.get('seq') for m in audio][:12]}..."
    if frames and (not audio or kinds.index(wire.FRAMES) < kinds.index(wire.AUDIO)):
        return "frames before the first audio"
    if [m.get("seq") for m in frames] != list(range(len(frames))):
        return "frames seq gap or repeat"
    if kinds.count(wire.AUDIO_ONLY) > 1 or (wire.AUDIO_ONLY in kinds and wire.FRAMES in
                                             kinds[kinds.index(wire.AUDIO_ONLY):]):
        return "frames after audio_only"
    ends = [m for m in mine if m.kind in (wire.TURN_END, wire.INTERRUPT)]
    if len(ends) != 1 or mine[-1] is not ends[0]:
        return f"{len(ends)} ends"
    played = b"".join(m.get("data") or b"" for m in audio)
    if ends[0].kind == wire.TURN_END:
        if played != clip:
            return f"audio {len(played)} bytes, clip {len(clip)}: not byte-identical"
    elif not clip.startswith(played):
        return "interrupted turn's audio is not a prefix of its clip"
    return None
