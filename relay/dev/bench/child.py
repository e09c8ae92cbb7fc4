"""Bench child processes (``python -m relay.dev.bench.<role>``) and the JSON-line protocol with
them.

The parent writes one JSON config line to a child's stdin, then commands as further lines; the
child answers with JSON events on stdout (``{"event": "ready"}``, ``{"event": "report", ...}``).
Its stderr goes to a log file.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from relay.errors import RelayError

_LINE_LIMIT = 256 * 1024 * 1024  # reports carry per-conversation tallies


class ChildFailed(RelayError):
    """A bench child exited or said something unexpected."""


class BenchChild:
    def __init__(self, name: str, module: str, log_dir: Path) -> None:
        self.name = name
        self._module = module
        self.log_path = log_dir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ChildFailed(f"{self.name} was not started")
        return self.proc.pid

    async def start(self, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self._module, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=err, env=env, limit=_LINE_LIMIT,
                start_new_session=True,
            )
        await self.send(config)

    async def send(self, message: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise ChildFailed(f"{self.name} was not started")
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        """The child's next event, which must be ``event``."""
        if self.proc is None or self.proc.stdout is None:
            raise ChildFailed(f"{self.name} was not started")
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        except TimeoutError as exc:
            raise ChildFailed(f"{self.name}: no {event!r} within {timeout_s:.0f}s; "
                              f"see {self.log_path}") from exc
        if not line:
            raise ChildFailed(f"{self.name} exited before {event!r}; see {self.log_path}")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != event:
            raise ChildFailed(f"{self.name}: expected {event!r}, got {message.get('event')!r}")
        return message

    async def receive(self) -> dict[str, Any] | None:
        """The child's next event, whatever it is; None once its stdout closed."""
        if self.proc is None or self.proc.stdout is None:
            raise ChildFailed(f"{self.name} was not started")
        line = await self.proc.stdout.readline()
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self, timeout_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# --- the child's side ------------------------------------------------------------------------


class ParentLink:
    """A child's stdin (config, then commands) and stdout (events)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    @classmethod
    async def open(cls) -> ParentLink:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return cls(reader)

    async def receive(self) -> dict[str, Any] | None:
        """The next line from the parent; None when the parent closed stdin."""
        line = await self._reader.readline()
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        return message

    @staticmethod
    def emit(event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()
