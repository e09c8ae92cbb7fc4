"""Instructions a Valkey server executes for a piece of work, counted by valgrind's callgrind.

A count, not a time: the same for the same binary, inputs and work, whatever else the machine
is doing, so a change of a few percent in what Redis runs per command shows on a 2-core VM whose
timings move by a fifth between runs. Used by ``relay bench --append-cost`` and ``--queue-cost``
with ``--instructions``, only where valgrind is installed (``available``).

``per_unit`` runs the work twice, each time on a fresh server started under callgrind, ``small``
and ``large`` units of it, and divides the difference of the two totals by the difference of the
units, so what both runs did besides (the server's start and stop, scripts loaded, setup)
cancels out.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay.dev.embedded import EmbeddedServer

_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)
_START_TIMEOUT_S = 120.0  # a server under valgrind starts tens of times slower


def available() -> bool:
    return shutil.which("valgrind") is not None


def total(path: Path) -> int:
    """The instruction total callgrind wrote at the server's exit."""
    match = _TOTAL.search(path.read_text())
    if match is None:
        raise RuntimeError(f"no instruction total in {path}")
    return int(match.group(1))


async def per_unit(work: Callable[[EmbeddedServer, int], Awaitable[int]], small: int,
                   large: int) -> float:
    """Instructions per unit of ``work(server, n)``, which does ``n`` units on ``server`` and
    returns how many it did (what it counts: calls, entries, submits)."""
    if not 0 < small < large:
        raise ValueError("need 0 < small < large")
    counted: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory(prefix="relay-callgrind-") as tmp:
        for n in (small, large):
            out = Path(tmp) / f"{n}.out"
            wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            server = EmbeddedServer(wrapper=wrapper).start(timeout_s=_START_TIMEOUT_S)
            try:
                units = await work(server, n)
            finally:
                server.stop()
            counted.append((units, total(out)))
    (small_units, small_total), (large_units, large_total) = counted
    return (large_total - small_total) / (large_units - small_units)
