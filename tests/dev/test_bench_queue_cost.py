"""`relay bench --queue-cost --quick`: the queue's Redis cost by clip length, both layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


@pytest.mark.timeout(300)
def test_quick_queue_cost_bench_measures_both_layouts(tmp_path):
    out = tmp_path / "queue-cost.json"
    counting = shutil.which("valgrind") is not None
    run = subprocess.run(
        [sys.executable, "-m", "relay", "bench", "--queue-cost", "--quick", "--instructions",
         "--out", str(out)],
        capture_output=True, text=True, timeout=280,
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
        timed = {"submit_redis_us", "take_redis_us", "submit_redis_cpu_us", "take_redis_cpu_us"}
        if not counting:
            assert set(row["ratios"]) == timed
            continue
        assert set(row["ratios"]) == timed | {"submit_instructions", "take_instructions",
                                              "turn_instructions"}
        for layout in ("stored", "inline"):
            counted = row[layout]["instructions"]
            assert counted["submit"] > 0 and counted["take"] > 0
    if counting:
        # 937 KB through the scripts, hashed and copied into Lua, against a RENAME and a GET.
        large = rows[1]
        assert large["inline"]["instructions"]["submit"] > large["stored"]["instructions"]["submit"]
        assert large["ratios"]["turn_instructions"] > 1
        assert "Valkey instructions per submit and per take" in run.stdout
    else:
        assert "valgrind" in result["queue_cost"]["instructions"]["skipped"]
    assert result["run_id"] and result["git_commit"]
