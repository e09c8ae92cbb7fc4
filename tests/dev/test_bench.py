"""``relay bench --quick`` end to end: every role in its own process, real sockets, real SDK.

Only correctness is asserted (everything appended was delivered once, in order, to every
client, on both paths, and the report has its keys). Timing figures are never asserted: they
depend on the machine and would make the suite flaky.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REQUIRED_KEYS = (
    "conversations", "delivered_msgs_per_s", "baseline_msgs_per_s", "throughput_ratio",
    "p50_ms", "p99_ms", "max_ms", "baseline_p99_ms", "lost", "duplicated", "reordered",
    "edge_cpu_us_per_msg", "redis_cmds_per_delivered_msg", "saturation", "steps",
)


@pytest.mark.timeout(300)
def test_quick_bench_delivers_every_message_once_in_order(tmp_path):
    out = tmp_path / "latest.json"
    run = subprocess.run(
        [sys.executable, "-m", "relay", "bench", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    assert out.exists(), run.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("machine", "date", "command", "git_commit", "edge_path", "full_path"):
        assert key in result
    for name in ("edge_path", "full_path"):
        figures = result[name]
        assert "error" not in figures, figures.get("error")
        missing = [key for key in REQUIRED_KEYS if key not in figures]
        assert not missing, f"{name} lacks {missing}"
        assert figures["delivered"] > 0
        assert (figures["lost"], figures["duplicated"], figures["reordered"]) == (0, 0, 0), name
        assert figures["seq_gaps"] == 0 and figures["order_violations"] == 0, name
        assert figures["mismatched_conversations"] == 0 and figures["missing_receivers"] == 0
        assert figures["baseline_correct"], name
    assert "edge_rss_kb_per_client" in result["edge_path"]
    edge = result["edge_path"]
    # The peers ran the same step; the naive edge loses nothing either (socket.io may, having
    # no resume, so only its delivery is checked).
    assert set(edge["peers"]) == {"naive", "socketio"}
    naive = edge["peers"]["naive"]
    assert (naive["lost"], naive["duplicated"], naive["reordered"]) == (0, 0, 0)
    assert edge["peers"]["socketio"]["delivered_msgs_per_s"] > 0
    assert edge["naive_edge_cpu_ratio"] is not None and edge["redis_cpu_us_per_msg"] is not None
    # The machine's floor ran the same schedule: everything the writer sent was forwarded to
    # a connected client, and the edge's figure is set against it.
    floor = edge["floor"]
    assert floor["sent"] > 0 and floor["forwarded"] == floor["sent"] and floor["unrouted"] == 0
    assert edge["floor_cpu_us_per_msg"] is not None and edge["edge_cpu_floor_ratio"] is not None
    # The edge's pub/sub connection was killed mid-load and it refilled: nothing lost.
    kill = edge["pubsub_kill_step"]
    assert kill["pubsub_connections_killed"] >= 1
    assert (kill["lost"], kill["duplicated"], kill["reordered"]) == (0, 0, 0)
    assert kill["undelivered_at_deadline"] == 0
    assert "producer_cpu_us_per_msg" in result["full_path"]
    assert run.returncode == 0, run.stdout[-3000:]
