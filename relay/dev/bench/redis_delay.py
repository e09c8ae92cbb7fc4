"""A TCP proxy in front of Redis that delays every byte by a fixed time each way, so the latency
bench can show what the relay's round trips cost when Redis is a network away (loopback hides
them: a round trip there is 0.1 ms).

Run as ``python -m relay.dev.bench.redis_delay``. Config: ``target_host`` (default 127.0.0.1)
and ``target_port`` of the Redis, ``delay_ms`` (one way). It listens on a free loopback port
(event ``ready`` with ``port``) and forwards each connection to the target, each direction in
order, every chunk held until ``delay_ms`` after it arrived: a fixed propagation delay, no
bandwidth limit, no loss. Written here because the tool made for it (``tc netem``) needs a
kernel module and root, which the bench machines do not all have. It stops when the parent
closes its stdin.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from relay.dev.bench.child import ParentLink

_READ_SIZE = 64 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Forward one direction: each chunk written ``delay_s`` after it was read, in order."""
    loop = asyncio.get_running_loop()
    held: deque[tuple[float, bytes]] = deque()
    arrived = asyncio.Event()
    done = False

    async def deliver() -> None:
        while held or not done:
            if not held:
                arrived.clear()
                await arrived.wait()
                continue
            due, chunk = held.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while chunk := await reader.read(_READ_SIZE):
            held.append((loop.time() + delay_s, chunk))
            arrived.set()
    except (ConnectionError, OSError):
        pass
    finally:
        done = True
        arrived.set()
        try:
            await sender
        except (ConnectionError, OSError):
            pass
        writer.close()


def _handler(config: dict[str, Any]) -> Any:
    delay_s = float(config["delay_ms"]) / 1000

    async def handle(client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                config.get("target_host", "127.0.0.1"), int(config["target_port"]))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pump(client_reader, server_writer, delay_s),
                             _pump(server_reader, client_writer, delay_s))

    return handle


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    server = await asyncio.start_server(_handler(config), "127.0.0.1", 0)
    link.emit("ready", port=server.sockets[0].getsockname()[1])
    await link.receive()  # until the parent closes stdin
    server.close()


if __name__ == "__main__":
    asyncio.run(_main())
