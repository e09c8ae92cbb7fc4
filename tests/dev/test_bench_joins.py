"""`relay bench --joins --quick`: the join-cost bench runs end to end against a real edge."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_joins_bench_measures_joins_and_refusals(tmp_path):
    out = tmp_path / "joins.json"
    run = subprocess.run(
        [sys.executable, "-m", "relay", "bench", "--joins", "--quick", "--out", str(out),
         "--joins-per-round", "40"],
        capture_output=True, text=True, timeout=100,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "edge CPU ms per connection" in run.stdout  # the table
    result = json.loads(out.read_text())["joins"]
    first, second = result["rounds"]
    for index, joined in enumerate((first, second)):
        assert (joined["connections"], joined["welcomed"], joined["failed"]) == (40, 40, 0)
        assert joined["already_connected"] == 40 * index  # earlier rounds stay connected
        assert joined["edge_cpu_ms_per_connection"] > 0
        assert joined["edge_redis_commands_per_connection"] >= 1  # a join reads Redis
        assert joined["connect_to_first_message_ms"]["n"] == 40
    refusing = result["refusing"]
    # A burst of one second's worth at 1 per second: the first is admitted, nearly all the rest
    # get error{too_many_connections} before any Redis read.
    assert refusing["failed"] == 0 and refusing["welcomed"] + refusing["refused"] == 40
    assert refusing["refused"] >= 30
    assert refusing["edge_redis_commands_per_connection"] < 1


def test_joins_per_round_is_checked():
    run = subprocess.run([sys.executable, "-m", "relay", "bench", "--joins",
                          "--joins-per-round", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--joins-per-round: 0: a count from 1 to 20000" in run.stderr
