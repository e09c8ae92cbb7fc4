"""``relay bench --latency --quick`` end to end: stack processes, real SDK, real WebSockets.

Asserted: every turn of every step ended complete with its first audio before its first frames,
and the report carries each figure, its baseline and the target verdicts. The latency figures
themselves are never asserted (they depend on the machine; the bench prints them).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from relay.dev.bench.latency import add_over_floor, evaluate, percentiles

FIGURES = ("submit_to_first_audio_ms", "submit_to_first_append_ms", "submit_to_first_frames_ms",
           "submit_to_first_frames_append_ms", "first_audio_to_first_frames_ms",
           "frames_after_sim_ms", "frames_after_nominal_sim_ms", "sim_first_batch_ms",
           "submit_call_ms")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_latency_bench_reports_every_turn(tmp_path):
    out = tmp_path / "latency.json"
    run = subprocess.run(
        [sys.executable, "-m", "relay", "bench", "--latency", "--quick", "--out", str(out),
         "--first-batch-delay-ms", "300", "--latency-settle-s", "0.2",
         "--redis-delay-ms", "0.5"],  # the roles' Redis behind the delaying proxy
        capture_output=True, text=True, timeout=280,
    )
    assert out.exists(), run.stderr[-3000:]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "x baseline" in run.stdout and "x idle baseline" in run.stdout  # with its ratios
    result = json.loads(out.read_text())["latency"]
    assert result["baseline_ms"]["n"] == 50 and result["baseline_ms"]["p50"] > 0
    # The idle baseline: the same round trip, each sample after the rounds' pause.
    assert result["baseline_idle_ms"]["n"] == 5 and result["baseline_idle_ms"]["p50"] > 0
    assert result["sim_first_batch_ms"] == 300
    assert result["options"]["settle_s"] == 0.2
    assert result["options"]["redis_delay_ms"] == 0.5
    assert [s["conversations"] for s in result["steps"]] == [1, 4]
    for step in result["steps"]:
        assert step["audio_before_frames_violations"] == 0
        for label, turns in (("first", step["conversations"]), ("later", step["conversations"])):
            part = step[label]
            assert (part["complete"], part["audio_only"], part["unfinished"]) == (turns, 0, 0)
            for name in FIGURES:
                assert part[name]["n"] == turns, (label, name)
            assert part["submit_to_first_audio_ms"]["p99_ratio"] is not None
            assert part["submit_to_first_audio_ms"]["p99_idle_ratio"] is not None
            # The simulator's 300 ms first batch is in every turn's first frames; what it really
            # took is found for every turn's request, is never less, and is what the frames
            # figure subtracts.
            assert part["submit_to_first_frames_ms"]["p50"] >= 300
            assert part["sim_first_batch_unmatched"] == 0
            assert part["sim_first_batch_ms"]["p50"] >= 300
            assert part["frames_after_sim_ms"]["max"] <= part["frames_after_nominal_sim_ms"]["max"]
        # The machine's floor for the same burst, run right after the step, every later turn
        # delivered; the relay's figures over it are there for both kinds of turns.
        floor = step["floor"]
        assert floor["conversations"] == step["conversations"]
        assert floor["submit_to_first_audio_ms"]["n"] == step["conversations"]
        assert floor["undelivered"] == 0 and floor["submit_to_first_audio_ms"]["p50"] > 0
        for label in ("first", "later"):
            over = step[label]["submit_to_first_audio_ms"]["over_floor"]
            assert over["p99"] == round(step[label]["submit_to_first_audio_ms"]["p99"]
                                        - floor["submit_to_first_audio_ms"]["p99"], 2)
    assert "later_first_audio_p99_ms_at_20" in result["targets"]
    assert "later_first_audio_over_floor_p99_ms_at_100" in result["targets"]
    assert "the machine's floor for the same burst" in run.stdout


def _step(n, first_p99, later_p99, floor_p99):
    def audio(p99):
        return {"submit_to_first_audio_ms": {"n": n, "p50": p99 / 2, "p99": p99, "max": p99},
                "frames_after_sim_ms": {"n": n, "p50": 5.0, "p99": 8.0, "max": 9.0}}
    return {"conversations": n, "first": audio(first_p99), "later": audio(later_p99),
            "floor": {"conversations": n, "undelivered": 0,
                      "submit_to_first_audio_ms": {"n": n, "p50": floor_p99 / 2,
                                                   "p99": floor_p99, "max": floor_p99}}}


def test_the_target_over_the_floor_is_the_relays_p99_less_the_floors():
    steps = [_step(20, 15.0, 16.4, 9.6), _step(100, 70.0, 74.0, 36.0)]
    for step in steps:
        add_over_floor(step)
    assert steps[0]["later"]["submit_to_first_audio_ms"]["over_floor"] == {"p50": 3.4, "p99": 6.8}
    verdicts = evaluate(steps)
    assert verdicts["later_first_audio_p99_ms_at_20"] == {"target": 10.0, "measured": 16.4,
                                                          "met": False}
    assert verdicts["later_first_audio_over_floor_p99_ms_at_20"] == {
        "target": 10.0, "measured": 6.8, "met": True}
    assert verdicts["later_first_audio_over_floor_p99_ms_at_100"] == {
        "target": 20.0, "measured": 38.0, "met": False}


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"n": 100, "p50": 50.0, "p99": 99.0, "max": 100.0}
    assert percentiles([3.0]) == {"n": 1, "p50": 3.0, "p99": 3.0, "max": 3.0}
    assert percentiles([])["p50"] is None


@pytest.mark.parametrize(("flag", "value", "error"), [
    ("--latency-settle-s", "-1", "-1: seconds from 0 to 60"),
    ("--latency-settle-s", "nan", "nan: seconds from 0 to 60"),
    ("--redis-delay-ms", "101", "101: milliseconds from 0 to 100"),
    ("--redis-delay-ms", "x", "x: milliseconds from 0 to 100"),
])
def test_latency_options_out_of_range_are_refused(flag, value, error):
    run = subprocess.run([sys.executable, "-m", "relay", "bench", "--latency", flag, value],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"{flag}: {error}" in run.stderr
