"""A deliberately light pipelined Redis writer for load generators.

redis-py's pipeline costs about 15 us of client CPU per XADD (measured on the bench machine);
at 60,000 appends per second that is most of a core taken from the system under test on a
2-core box. This writer packs RESP itself and parses replies with hiredis (about 4 us per
XADD), and is used identically by the relay runs and the bare-loop baseline, so the comparison
isolates delivery. It only writes; reads go through redis-py.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlparse

import hiredis


def pack(*args: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def xadd_prefix(key: bytes, maxlen: int | None, field: bytes) -> bytes:
    """RESP of ``XADD key [MAXLEN ~ maxlen] * field`` missing only its value argument."""
    trim = (b"MAXLEN", b"~", str(maxlen).encode()) if maxlen else ()
    args = (b"XADD", key, *trim, b"*", field)
    head = pack(*args)
    count = b"*%d" % len(args)
    return b"*%d" % (len(args) + 1) + head[len(count):]  # one more argument (the value) follows


def value(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


class RespPipe:
    """One connection; ``send`` a batch of packed commands and get their replies in order."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()
        self.commands = 0

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()

    async def send(self, commands: list[bytes]) -> list[Any]:
        """Write all commands at once, return their replies (errors come back as exceptions
        objects, not raised, so one bad command does not hide the others' results)."""
        if self._reader is None or self._writer is None:
            raise RuntimeError("RespPipe.send before connect")
        if not commands:
            return []
        self._writer.write(b"".join(commands))
        self.commands += len(commands)
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = self._parser.gets()
            if reply is False:
                data = await self._reader.read(1 << 16)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                self._parser.feed(data)
                continue
            replies.append(reply)
        return replies
