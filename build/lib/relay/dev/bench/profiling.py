"""Sampling profiles of a running role process with py-spy, summarised as hot functions."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
RATE_HZ = 100
# Frames every sample passes through (interpreter start, the event loop's dispatch): they say
# nothing about where the time goes, so the inclusive table leaves them out.
_PLUMBING = frozenset({
    "<module>", "_run_module_as_main", "_run_code", "main", "_dispatch", "run", "Runner.run",
    "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever", "BaseEventLoop._run_once",
    "Handle._run", "run_edge", "run_app", "_run_app", "Context.run",
})


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


async def record(pid: int, seconds: float, out: Path) -> Path | None:
    """Sample ``pid`` for ``seconds`` without pausing it; None when py-spy is unavailable."""
    binary = py_spy()
    if binary is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        binary, "record", "--pid", str(pid), "--duration", str(int(seconds)),
        "--rate", str(RATE_HZ), "--format", "raw", "--nonblocking", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        (out.with_suffix(".err")).write_bytes(err)
        return None
    return out


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    short = "/".join(Path(path).parts[-2:]) if "site-packages" in path or "/" in path else path
    return f"{match.group('func')} ({short})"


def summarise(raw: Path, seconds: float, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares of active samples per function, hottest first."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            if name.split(" (", 1)[0] not in _PLUMBING:
                inclusive[name] += count
    expected = seconds * RATE_HZ

    def table(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / samples, 1)] for name, n in counter.most_common(top)]

    return {
        "samples": samples,
        "busy_fraction": round(samples / expected, 2) if expected else None,
        "self_pct": table(own) if samples else [],
        "inclusive_pct": table(inclusive) if samples else [],
        "raw": str(raw),
    }
