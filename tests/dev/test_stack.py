"""``relay run`` as a developer uses it: a taken port is named at once, ``--edge-port 0`` takes
free ports, the banner's commands work when pasted, Ctrl-C stops the processes in order, and
nothing outlives a stack that is killed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.tokens import verify_token
from tests.cli.test_jobs_cli import write_wav
from tests.helpers.polling import eventually
from tests.helpers.producer import tone


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RELAY_", "SPATIUS_")) and k != "REDIS_URL"}


def test_a_taken_edge_port_is_named_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "relay", "run", "--edge-port", str(port)],
                                cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 2, result.stderr
    assert (f"relay: edge-1 cannot listen on 127.0.0.1:{port}: Address already in use (change "
            "--edge-port N, or --edge-port 0 for free ports)") in result.stderr
    assert not (tmp_path / ".run").exists()  # no Valkey, simulator or producer was started


def children_of(pid: int) -> set[int]:
    """Every live descendant of pid (from /proc: children left their parent's session)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


async def start_stack(tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "run", "--edge-port", "0", "--conversations", "1",
        "--turns", "1", cwd=tmp_path, env=clean_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    banner = ""
    while "serving; press Ctrl-C" not in banner:
        line = await asyncio.wait_for(proc.stdout.readline(), 90)
        assert line, f"relay run ended early:\n{banner}"
        banner += line.decode()
    return proc, banner


def shell(tmp_path: Path, command: str) -> subprocess.CompletedProcess[str]:
    """A command as pasted into a fresh shell in the project directory."""
    return subprocess.run(["bash", "-c", command], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
async def test_free_ports_pasted_commands_and_ordered_stop(tmp_path):
    proc, banner = await start_stack(tmp_path)
    try:
        edges = re.findall(r"edge +ws://127\.0\.0\.1:(\d+)/", banner)
        assert len(edges) == 2 and "8080" not in edges and edges[0] != edges[1], banner
        assert "source .run/env" in banner
        env_file = tmp_path / ".run" / "env"
        assert env_file.stat().st_mode & 0o077 == 0  # holds the token secret

        token = shell(tmp_path, "source .run/env && relay token conv-pasted")
        assert token.returncode == 0, token.stderr
        secret = re.search(r"RELAY_TOKEN_SECRET=(\S+)", env_file.read_text()).group(1)
        verify_token(secret.strip("'"), token.stdout.strip(), "conv-pasted")
        write_wav(tmp_path / "speech.wav", tone(0.3), rate=16000)
        turn = shell(tmp_path, "source .run/env && relay enqueue conv-pasted speech.wav")
        assert turn.returncode == 0 and turn.stdout.strip(), turn.stderr
        listed = shell(tmp_path, "source .run/env && relay jobs --json")
        assert listed.returncode == 0 and "queued" in json.loads(listed.stdout), listed.stderr

        children = children_of(proc.pid)
        assert len(children) >= 5  # valkey, simulator, producer, two edges
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert await asyncio.wait_for(proc.wait(), 90) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not any(alive(pid) for pid in children)
    assert not env_file.exists()
    logs = tmp_path / ".run" / "logs"
    stopped = {name: stop_time(logs / f"{name}.log", event)
               for name, event in (("edge-1", "edge_stopped"), ("edge-2", "edge_stopped"),
                                   ("producer-1", "producer_stopped"))}
    assert max(stopped["edge-1"], stopped["edge-2"]) <= stopped["producer-1"]
    # Valkey outlived the producer: it released its session leases without a Redis error.
    assert "failed" not in (logs / "producer-1.log").read_text()


def stop_time(log: Path, event: str) -> str:
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            return str(json.loads(line)["timestamp"])
    raise AssertionError(f"{event} not in {log}:\n{log.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGHUP])
async def test_nothing_outlives_the_stack(tmp_path, how):
    proc, _ = await start_stack(tmp_path)
    children = children_of(proc.pid)
    assert len(children) >= 5
    proc.send_signal(how)  # SIGKILL: no cleanup at all; SIGHUP: the terminal was closed
    await asyncio.wait_for(proc.wait(), 90)
    await eventually(lambda: not any(alive(pid) for pid in children), timeout_s=40,
                     interval_s=0.2, what="every child of the stack gone")
