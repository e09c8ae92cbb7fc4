"""Per-receiver delivery checks that need no copy of the stream: order, duplicates, gaps, hash.

Every receiver (a WebSocket client, or the bare-loop reader) keeps one ``Tally`` per conversation.
At the end it is compared with the truth (what was appended, as a count and an order-independent
hash of the entry ids): a count below the truth is loss, an equal count with another hash means
wrong entries were delivered.
"""

from __future__ import annotations

import zlib
from collections import Counter, deque
from typing import Any

from relay.dev.bench.histogram import Histogram

HASH_MOD = 1 << 64
_RECENT = 512  # ids remembered to tell a duplicate from an out-of-order entry


def id_hash(entry_id: bytes) -> int:
    return zlib.crc32(entry_id)


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Receipts:
    """Process-wide receive statistics shared by all tallies of one receiver process."""

    def __init__(self) -> None:
        self.latency = Histogram()  # stream append (entry id ms) -> receipt
        self.input_latency = Histogram()  # scheduled audio send time -> receipt (audio only)
        self.bins: Counter[int] = Counter()  # receipts per 100 ms of wall time

    def to_json(self) -> dict[str, Any]:
        return {"latency": self.latency.to_json(), "input_latency": self.input_latency.to_json(),
                "bins": [[k, v] for k, v in sorted(self.bins.items())]}


class Tally:
    __slots__ = ("conversation", "last", "last_id", "count", "hash", "duplicated", "reordered",
                 "gaps", "violations", "_recent", "_recent_set", "_turn", "_next_audio",
                 "_next_frames", "_audio_seen", "kinds")

    def __init__(self, conversation: str) -> None:
        self.conversation = conversation
        self.last = (0, -1)
        self.last_id: str | None = None
        self.count = 0
        self.hash = 0
        self.duplicated = 0
        self.reordered = 0
        self.gaps = 0
        self.violations = 0
        self._recent: deque[str] = deque()
        self._recent_set: set[str] = set()
        self._turn: str | None = None
        self._next_audio = 0
        self._next_frames = 0
        self._audio_seen = False
        self.kinds: Counter[str] = Counter()

    def on_entry(self, entry_id: str, body: dict[str, Any], now_ms: float,
                 receipts: Receipts) -> bool:
        """Record one stream message; False when it is a duplicate or out of order."""
        key = parse_id(entry_id)
        if key <= self.last:
            if entry_id in self._recent_set:
                self.duplicated += 1
            else:
                self.reordered += 1
            return False
        self.last, self.last_id = key, entry_id
        self.count += 1
        self.hash = (self.hash + id_hash(entry_id.encode())) % HASH_MOD
        self._remember(entry_id)
        receipts.latency.add(now_ms - key[0])
        receipts.bins[int(now_ms // 100)] += 1
        self._check_turn(body, now_ms, receipts)
        return True

    def _remember(self, entry_id: str) -> None:
        self._recent.append(entry_id)
        self._recent_set.add(entry_id)
        if len(self._recent) > _RECENT:
            self._recent_set.discard(self._recent.popleft())

    def _check_turn(self, body: dict[str, Any], now_ms: float, receipts: Receipts) -> None:
        kind = body.get("kind", "")
        self.kinds[kind] += 1
        turn = body.get("turn")
        if turn != self._turn:
            self._turn, self._next_audio, self._next_frames = turn, 0, 0
            self._audio_seen = False
        if kind == "audio":
            seq = body.get("seq", -1)
            self.gaps += seq != self._next_audio
            self._next_audio = seq + 1
            self._audio_seen = True
            scheduled = _scheduled_ms(turn, seq)
            if scheduled is not None:
                receipts.input_latency.add(now_ms - scheduled)
        elif kind == "frames":
            seq = body.get("seq", -1)
            self.gaps += seq != self._next_frames
            self._next_frames = seq + 1
            self.violations += not self._audio_seen  # guarantee 2: audio before frames

    def to_json(self) -> dict[str, Any]:
        return {"c": self.conversation, "n": self.count, "h": self.hash, "dup": self.duplicated,
                "reo": self.reordered, "gaps": self.gaps, "viol": self.violations,
                "last": self.last_id, "kinds": dict(self.kinds)}


def _scheduled_ms(turn: Any, seq: int) -> float | None:
    """Scheduled send time of audio chunk ``seq`` from a bench turn id ``t<n>-<start ms>``."""
    if not isinstance(turn, str) or not turn.startswith("t"):
        return None
    _, _, start = turn.partition("-")
    if not start.isdigit():
        return None
    return int(start) + seq * 40
