"""What the kernel says about a process and the machine: CPU seconds, resident memory, hardware."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (threads included), from /proc/<pid>/stat; 0.0 once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name is in parentheses and may contain spaces; fields follow the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/<pid>/status; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over all cores."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user..steal; guest time is already inside user
    return (total - idle) / _CLOCK_TICKS, total / _CLOCK_TICKS


@dataclass(frozen=True)
class Machine:
    nproc: int
    cpu_model: str
    ram_gib: float
    kernel: str
    python: str

    def as_dict(self) -> dict[str, object]:
        return {"nproc": self.nproc, "cpu_model": self.cpu_model, "ram_gib": self.ram_gib,
                "kernel": self.kernel, "python": self.python}


def machine() -> Machine:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    ram_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            ram_kb = int(line.split()[1])
    return Machine(nproc=os.cpu_count() or 0, cpu_model=model,
                   ram_gib=round(ram_kb / 1024 / 1024, 1), kernel=platform.release(),
                   python=platform.python_version())


def run_meta(command: str) -> dict[str, Any]:
    """What every bench result starts with: its run id (UTC, to the second), date, the command
    that made it, the commit and the machine."""
    now = datetime.now(UTC)
    return {"run_id": now.strftime("%Y%m%dT%H%M%SZ"), "date": now.isoformat(timespec="seconds"),
            "command": command, "git_commit": git_commit(), "machine": machine().as_dict()}


def write_result(meta: dict[str, Any], name: str, figures: dict[str, Any], out: Path,
                 ) -> dict[str, Any]:
    """A one-shot bench's result (``run_meta`` taken at its start, its figures under ``name``),
    written to ``out`` as JSON."""
    result = {**meta, name: figures}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return result


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's short hash, ``+dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, check=True,
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               check=True, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty.strip() else head


def tcp_local_ports(pids: dict[str, int]) -> dict[int, str]:
    """Local TCP port -> name, for the sockets each named process holds (loopback bench only)."""
    inode_owner: dict[str, str] = {}
    for name, pid in pids.items():
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode_owner[target[8:-1]] = name
    ports: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            owner = inode_owner.get(cols[9])
            if owner is not None:
                ports[int(cols[1].rsplit(":", 1)[1], 16)] = owner
    return ports
