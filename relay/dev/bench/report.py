"""The human-readable side of a run: a terminal table and a section for docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

_COLUMNS = (
    ("conv", "conversations", "{}"),
    ("offered/s", "offered_msgs_per_s", "{:,.0f}"),
    ("deliv/s", "delivered_msgs_per_s", "{:,.0f}"),
    ("bare/s", "baseline_msgs_per_s", "{:,.0f}"),
    ("ratio", "throughput_ratio", "{:.2f}"),
    ("p50ms", "p50_ms", "{:.1f}"),
    ("p99ms", "p99_ms", "{:.1f}"),
    ("maxms", "max_ms", "{:.0f}"),
    ("bare p99", "baseline_p99_ms", "{:.1f}"),
    ("p99x", "p99_ratio", "{:.1f}"),
    ("send p99", "input_p99_ms", "{:.0f}"),
    ("lost/dup/reo", None, ""),
    ("edge us/msg", "edge_cpu_us_per_msg", "{:.1f}"),
    ("floor us/msg", "floor_cpu_us_per_msg", "{:.1f}"),
    ("redis us/msg", "redis_cpu_us_per_msg", "{:.1f}"),
    ("script us/entry", "append_script_us_per_entry", "{:.1f}"),
    ("prod us/msg", "producer_cpu_us_per_msg", "{:.1f}"),
    ("cmd/msg", "redis_cmds_per_delivered_msg", "{:.3f}"),
    ("edge cmd/msg", "edge_redis_cmds_per_delivered_msg", "{:.3f}"),
    ("KB/client", "edge_rss_kb_per_client", "{:.1f}"),
    ("KB/conv", "redis_memory_bytes_per_conversation", None),
    ("busy%", "machine_busy_pct", "{:.0f}"),
    ("ok", "passes", None),
)


def _cell(row: dict[str, Any], key: str | None, fmt: str | None) -> str:
    if key is None:
        text = f"{row.get('lost', '-')}/{row.get('duplicated', '-')}/{row.get('reordered', '-')}"
        late = row.get("undelivered_at_deadline")
        return f"{text} (+{late:,} late)" if late else text
    value = row.get(key)
    if value is None:
        return "-"
    if key == "redis_memory_bytes_per_conversation":
        return f"{value / 1024:,.0f}"
    if key == "passes":
        return "yes" if value else "NO"
    return fmt.format(value) if fmt else str(value)


def table_rows(path: dict[str, Any]) -> list[list[str]]:
    return [[_cell(row, key, fmt) for _, key, fmt in _COLUMNS] for row in path["steps"]]


_PEER_HEADER = ("conv", "edge us/msg relay", "naive", "socketio", "ratio naive", "ratio sio",
                "redis us/msg relay", "naive", "socketio", "p99ms relay", "naive", "socketio",
                "lost/dup/reo relay", "naive", "socketio")


def peer_rows(path: dict[str, Any]) -> list[list[str]]:
    """One row per edge step: the relay's edge and each peer side by side (ratios: peer/relay)."""
    rows = []
    for row in path["steps"]:
        peers = row.get("peers") or {}
        sides = [row, peers.get("naive") or {}, peers.get("socketio") or {}]
        cpu, redis_cpu, p99 = ([_peer_cell(side, key, "{:.1f}") for side in sides]
                               for key in ("edge_cpu_us_per_msg", "redis_cpu_us_per_msg",
                                           "p99_ms"))
        correctness = [_cell(side, None, None) if "lost" in side else _peer_cell(side, "", "")
                       for side in sides]
        rows.append([str(row["conversations"]), *cpu,
                     _fmt(row.get("naive_edge_cpu_ratio"), "{:.1f}"),
                     _fmt(row.get("socketio_edge_cpu_ratio"), "{:.1f}"),
                     *redis_cpu, *p99, *correctness])
    return rows


def _peer_cell(side: dict[str, Any], key: str, fmt: str) -> str:
    if "skipped" in side:
        return "(saturated)"
    if "error" in side and side["error"]:
        return "error"
    return _fmt(side.get(key), fmt)


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    return ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
            *("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)]


def _kill_line(path: dict[str, Any]) -> list[str]:
    kill = path.get("pubsub_kill_step")
    if not kill:
        return []
    return [f"  pub/sub connection killed {kill.get('pubsub_connections_killed')} times "
            f"mid-load at {kill['conversations']} conversations: lost/dup/reo "
            f"{_cell(kill, None, None)}, "
            f"p99 {_fmt(kill.get('p99_ms'), '{:.1f}')} ms, edge "
            f"{_fmt(kill.get('edge_cpu_us_per_msg'), '{:.1f}')} us/msg"]


def render_table(result: dict[str, Any]) -> str:
    lines: list[str] = []
    for title, key in (("edge path", "edge_path"), ("full path", "full_path")):
        path = result.get(key)
        if not path:
            continue
        lines.append(f"{title} (each step against the bare loop at the same count)")
        lines += _table([name for name, _, _ in _COLUMNS], table_rows(path))
        lines += _summary(path)
        if any("peers" in row for row in path["steps"]):
            lines.append("  peers at each step (ratio = peer / relay, above 1: the relay is "
                         "cheaper):")
            lines += ["  " + line for line in _table(_PEER_HEADER, peer_rows(path))]
        lines += _kill_line(path)
        lines.append("")
    for name, verdict in result.get("targets", {}).items():
        lines.append(f"target {name}: {verdict_word(verdict, 'MISSED')} "
                     f"({_verdict_text(verdict)})")
    return "\n".join(lines)


def verdict_word(verdict: dict[str, Any], missed: str) -> str:
    """"met", ``missed``, or "not measured" when the run had nothing to judge by (met: None)."""
    met = verdict.get("met")
    return "not measured" if met is None else "met" if met else missed


def _summary(path: dict[str, Any]) -> list[str]:
    sat = path["saturation"]
    lines = [f"  saturation ({sat['criterion']}): last passing {sat['last_passing_conversations']}"
             f" conversations, first failing {sat['first_failing_conversations']}"]
    profile = path.get("profile") or {}
    summary = profile.get("summary")
    if summary:
        hot = ", ".join(f"{name} {pct}%" for name, pct in summary["self_pct"][:6])
        lines.append(f"  {profile['role']} profile at {profile['conversations']} conversations "
                     f"(busy {summary['busy_fraction']}): {hot}")
    return lines


def _verdict_text(verdict: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in verdict.items() if k != "met")


def markdown_section(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        f"### Run {result['run_id']}",
        "",
        f"- date: {result['date']}; commit: `{result['git_commit']}`; command: "
        f"`{result['command']}`",
        f"- machine: {machine['nproc']} cores ({machine['cpu_model']}), "
        f"{machine['ram_gib']} GiB RAM, kernel {machine['kernel']}, Python {machine['python']}, "
        f"{result.get('redis_server', 'valkey')}; everything on this one box, loopback only",
        f"- load per step: {result['duration_s']} s; standard conversation "
        f"{result['standard_conversation']['messages_per_s_per_conversation']} msgs/s",
        "",
    ]
    header = [name for name, _, _ in _COLUMNS]
    for title, key in (("Edge path", "edge_path"), ("Full path", "full_path")):
        path = result.get(key)
        if not path:
            continue
        lines += [f"{title}:", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(path)]
        lines += ["", *(line.strip() for line in _summary(path)), ""]
        if any("peers" in row for row in path["steps"]):
            lines += ["Peers at each step (ratio = peer / relay; above 1: the relay is cheaper):",
                      "", "| " + " | ".join(_PEER_HEADER) + " |", "|" + "---|" * len(_PEER_HEADER)]
            lines += ["| " + " | ".join(row) + " |" for row in peer_rows(path)]
            lines.append("")
        lines += [line.strip() for line in _kill_line(path)]
        lines.append("")
    for name, verdict in result.get("targets", {}).items():
        lines.append(f"- target {name}: **{verdict_word(verdict, 'missed')}** "
                     f"({_verdict_text(verdict)})")
    lines.append("")
    return "\n".join(lines)
