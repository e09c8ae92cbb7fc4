"""Turning receiver and writer reports into a step's figures."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from relay.dev.bench.histogram import Histogram
from relay.dev.bench.procstat import cpu_seconds, machine_busy_seconds
from relay.dev.bench.tally import parse_id


@dataclass(frozen=True)
class CpuSnap:
    wall: float
    procs: dict[str, float]
    busy: float
    total: float


def cpu_snap(pids: dict[str, int]) -> CpuSnap:
    busy, total = machine_busy_seconds()
    return CpuSnap(time.time(), {name: cpu_seconds(pid) for name, pid in pids.items()}, busy,
                   total)


def cpu_delta(before: CpuSnap, after: CpuSnap) -> dict[str, Any]:
    wall = after.wall - before.wall
    procs = {name: round(after.procs[name] - before.procs.get(name, 0.0), 3)
             for name in after.procs}
    total = after.total - before.total
    return {
        "wall_s": round(wall, 3),
        "machine_busy_pct": round(100 * (after.busy - before.busy) / total, 1) if total else None,
        "cpu_s": procs,
        "core_pct": {name: round(100 * s / wall, 1) for name, s in procs.items()} if wall else {},
    }


# conversation -> (entries appended, id hash, last id appended)
Truth = dict[str, tuple[int, int, str | None]]


def receivers(reports: list[dict[str, Any]], truth: Truth, window: tuple[float, float]
              ) -> dict[str, Any]:
    """Delivery figures over all receivers of a step, checked against ``truth``."""
    latency = Histogram.merged(Histogram.from_json(r["receipts"]["latency"]) for r in reports)
    inputs = Histogram.merged(Histogram.from_json(r["receipts"]["input_latency"])
                              for r in reports)
    t0, t1 = window
    in_window = sum(count for r in reports for key, count in r["receipts"]["bins"]
                    if t0 * 10 <= key < t1 * 10)
    check = _check(reports, truth)
    return {
        "delivered": latency.total,
        "delivered_in_window": in_window,
        "delivered_msgs_per_s": round(in_window / (t1 - t0), 1),
        "p50_ms": latency.percentile(50), "p99_ms": latency.percentile(99),
        "max_ms": round(latency.max_ms, 1),
        "input_p50_ms": inputs.percentile(50), "input_p99_ms": inputs.percentile(99),
        **check,
        "reconnects": sum(r.get("reconnects", 0) for r in reports),
        "connect_errors": sum(r.get("connect_errors", 0) for r in reports),
        "close_codes": _merge_counts(r.get("close_codes", {}) for r in reports),
    }


def _check(reports: list[dict[str, Any]], truth: Truth) -> dict[str, Any]:
    """Loss is a hole: a receiver that got its conversation's last entry but fewer entries than
    were appended. A receiver still behind at the deadline (the relay was saturated) has its
    missing tail counted as undelivered instead: in-order delivery means a tail, not holes,
    and holes inside what it did get would show as sequence gaps."""
    lost = undelivered = duplicated = reordered = gaps = violations = mismatched = extra = 0
    kinds: dict[str, int] = {}
    seen = 0
    for report in reports:
        for tally in report["tallies"]:
            seen += 1
            want_n, want_h, want_last = truth.get(tally["c"], (0, 0, None))
            missing = max(0, want_n - tally["n"])
            if _reached(tally["last"], want_last):
                lost += missing
            else:
                undelivered += missing
            extra += max(0, tally["n"] - want_n)
            mismatched += tally["n"] == want_n and tally["h"] != want_h
            duplicated += tally["dup"]
            reordered += tally["reo"]
            gaps += tally["gaps"]
            violations += tally["viol"]
            for kind, count in tally["kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + count
    missing_receivers = max(0, len(truth) - seen)
    return {"lost": lost, "undelivered_at_deadline": undelivered,
            "duplicated": duplicated, "reordered": reordered,
            "seq_gaps": gaps, "order_violations": violations,
            "mismatched_conversations": mismatched, "unexpected": extra,
            "missing_receivers": missing_receivers, "kinds": kinds}


def _reached(last: str | None, target: str | None) -> bool:
    if target is None:
        return True
    return last is not None and parse_id(last) >= parse_id(target)


def _merge_counts(parts: Any) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in parts:
        for key, count in part.items():
            merged[key] = merged.get(key, 0) + count
    return merged


def correct(figures: dict[str, Any]) -> bool:
    return not any(figures.get(k) for k in ("lost", "duplicated", "reordered", "seq_gaps",
                                            "order_violations", "mismatched_conversations",
                                            "unexpected", "missing_receivers"))
