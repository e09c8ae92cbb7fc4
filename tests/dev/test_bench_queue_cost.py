"""`relay bench --queue-cost --quick`: the queue's Redis cost by clip length, both layouts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_quick_queue_cost_bench_measures_both_layouts(tmp_path):
    out = tmp_path / "queue-cost.json"
    run = subprocess.run(
        [sys.executable, "-m", "relay", "bench", "--queue-cost", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=100,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "submit us stored / inline" in run.stdout  # the table
    result = json.loads(out.read_text())
    rows = result["queue_cost"]["rows"]
    assert [(r["stored"]["sample_rate"], r["stored"]["clip_s"]) for r in rows] == [
        (16_000, 1.0), (48_000, 10.0)]
    for row in rows:
        for layout in ("stored", "inline"):
            figures = row[layout]
            assert figures["layout"] == layout
            assert figures["clip_bytes"] == figures["sample_rate"] * figures["clip_s"] * 2
            for name in ("submit_redis_us", "take_redis_us"):
                assert figures[name] > 0  # commands ran inside Redis and were counted
        assert set(row["ratios"]) == {"submit_redis_us", "take_redis_us",
                                      "submit_redis_cpu_us", "take_redis_cpu_us"}
    assert result["run_id"] and result["git_commit"]
