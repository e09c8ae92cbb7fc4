"""How ``relay bench`` judges issue 11's targets from the step rows it measured (pure logic).

A target the run had nothing to judge by must say so ("not measured"), never pass by default.
"""

from __future__ import annotations

from relay.dev.bench.report import verdict_word
from relay.dev.bench.runner import live_path_verdicts

RATE = 28.47  # the standard conversation's messages per second


def _row(n: int, p99: float, *, offered_share: float = 1.0, peers: dict | None = None) -> dict:
    row = {"conversations": n, "p99_ms": p99, "offered_msgs_per_s": RATE * n * offered_share,
           "lost": 0, "duplicated": 0, "reordered": 0, "undelivered_at_deadline": 0}
    if peers is not None:
        row["peers"] = peers
    return row


def _peer(n: int, p99: float) -> dict:
    return {"conversations": n, "p99_ms": p99, "lost": 0, "duplicated": 0, "reordered": 0,
            "undelivered_at_deadline": 0}


def _largest(steps: list[dict]) -> dict:
    return live_path_verdicts({"steps": steps}, RATE)["largest_p99_le_50ms_step_3x_best_peer"]


def test_without_peer_runs_the_peer_comparison_is_not_measured():
    verdict = _largest([_row(50, 3.0), _row(100, 4.0)])
    assert verdict["met"] is None
    assert verdict_word(verdict, "MISSED") == "not measured"


def test_the_relay_needs_three_times_the_best_peers_largest_passing_step():
    peers = {"naive": _peer(100, 8.0), "socketio": _peer(100, 90.0)}
    slow_peers = {"naive": _peer(300, 160.0), "socketio": _peer(300, 900.0)}
    passing = _largest([_row(100, 4.0, peers=peers), _row(300, 30.0, peers=slow_peers)])
    assert passing["met"] is True and passing["peers_largest_step"]["naive"] == 100
    failing = _largest([_row(100, 4.0, peers=peers), _row(300, 60.0, peers=slow_peers)])
    assert failing["met"] is False and failing["relay_largest_step"] == 100


def test_peers_failing_every_step_are_compared_with_the_smallest_step_they_ran():
    peers = {"naive": _peer(50, 120.0)}
    verdict = _largest([_row(50, 3.0, peers=peers), _row(100, 4.0)])
    assert verdict["peers_below_step"] == 50
    assert verdict["met"] is False  # 100 < 3 x 50: below 50 is all that is known of the peer
    assert _largest([_row(50, 3.0, peers=peers), _row(150, 4.0)])["met"] is True


def test_p99_counts_only_at_steps_the_writer_could_generate():
    steps = [_row(50, 3.0), _row(500, 40.0), _row(1000, 400.0, offered_share=0.5)]
    verdict = live_path_verdicts({"steps": steps}, RATE)["edge_p99_le_50ms_every_generated_step"]
    assert verdict["measured"] == {50: 3.0, 500: 40.0}
    assert verdict["not_generated"] == [1000]
    assert verdict["met"] is True
    steps[1]["p99_ms"] = 51.0
    assert live_path_verdicts({"steps": steps}, RATE)[
        "edge_p99_le_50ms_every_generated_step"]["met"] is False


def test_a_step_that_broke_fails_the_generated_p99_target():
    broken = {"conversations": 300, "error": "edge-300-writer: no report", "passes": False}
    verdict = live_path_verdicts({"steps": [_row(50, 3.0), broken]}, RATE)[
        "edge_p99_le_50ms_every_generated_step"]
    assert verdict["measured"] == {50: 3.0, 300: None}
    assert verdict["met"] is False
