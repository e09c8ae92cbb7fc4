"""What one ``relay bench`` invocation runs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from relay.dev.bench.schedule import ConversationShape

SATURATION_P99_MS = 200.0


@dataclass(frozen=True)
class BenchOptions:
    paths: tuple[str, ...] = ("edge", "full")
    # Every edge step runs (a cost curve), each with the peers (naive per-client-XREAD edge,
    # python-socketio's Redis manager) until a peer saturates; then one more step with the edge's
    # pub/sub connection killed mid-load (``kill_at`` conversations, 0 = none).
    edge_steps: tuple[int, ...] = (50, 100, 300, 500, 1000, 2000)
    edge_target: int = 2000
    peers: bool = True
    kill_at: int = 500
    full_steps: tuple[int, ...] = (25, 50, 100, 200)
    full_target: int = 200
    duration_s: float = 8.0
    shape: ConversationShape = field(default_factory=ConversationShape)
    client_processes: int = 4
    bisect: int = 0  # extra steps between the last passing and the first failing step
    profile_s: float = 0.0  # 0 = no profiling runs
    drain_s: float = 15.0  # after the load stops, receivers get this long to catch up
    maxlen: int = 10_000
    quick: bool = False
    out: Path = Path("bench/results/latest.json")
    markdown: Path | None = None  # append the run's figures to this file (docs/benchmarks.md)

    @classmethod
    def quick_mode(cls, **changes: object) -> BenchOptions:
        """Small counts, well under a minute: the correctness smoke run the test suite uses."""
        base = cls(edge_steps=(40,), edge_target=40, kill_at=40, full_steps=(8,), full_target=8,
                   duration_s=5.0, shape=ConversationShape(turn_s=2.0, gap_s=0.4),
                   client_processes=2, bisect=0, profile_s=0.0, drain_s=15.0, quick=True)
        return replace(base, **changes)  # type: ignore[arg-type]
