"""`relay bench --append-cost --quick`: the fenced append's Redis cost per entry, three ways."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


@pytest.mark.timeout(150)
def test_quick_append_cost_bench_stores_every_entry_three_ways(tmp_path):
    out = tmp_path / "append-cost.json"
    counting = shutil.which("valgrind") is not None
    run = subprocess.run(
        [sys.executable, "-m", "relay", "bench", "--append-cost", "--quick", "--instructions",
         "--out", str(out)],
        capture_output=True, text=True, timeout=140,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| way | Redis CPU us |" in run.stdout  # the table
    result = json.loads(out.read_text())["append_cost"]
    ways = result["ways"]
    assert list(ways) == ["xadd", "xadd_spublish", "append"]
    for figures in ways.values():
        # 500 calls, every fifth slot with its animation message: 500 audio + 100 frames entries,
        # all of them read back from the streams, none refused.
        assert (figures["calls"], figures["entries"], figures["stored"]) == (500, 600, 600)
        assert figures["errors"] == 0
        assert figures["redis_us_per_entry"] > 0
    instructions = result["instructions_per_entry"]
    if counting:
        # The script runs the plain commands and more: it can never cost fewer instructions.
        assert instructions["append"] > instructions["xadd_spublish"] > instructions["xadd"] > 0
        assert result["ratios"]["instructions_append_over_xadd"] > 1
    else:
        assert "valgrind" in instructions["skipped"]


def test_instructions_without_append_cost_is_refused():
    run = subprocess.run([sys.executable, "-m", "relay", "bench", "--instructions"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--instructions counts only with --append-cost" in run.stderr
