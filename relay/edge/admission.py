"""Who may open a WebSocket on this edge, and how refusals look in the logs.

Everything a client can get wrong before its session starts is refused here or in
``relay.edge.app`` with a documented answer (docs/protocol.md "Refusals") and exactly one
structured log line, never a traceback, and never the request's URL, query string or headers:
the token travels in the query string.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from aiohttp import WSCloseCode, web

from relay import wire
from relay.settings import Settings, normalise_origin

log = structlog.get_logger(__name__)

# Frame-level violations aiohttp detects itself (and then closes with the RFC 6455 code): the
# error a client gets first, so that a browser can see why.
FRAME_ERRORS: dict[int, tuple[str, str]] = {
    WSCloseCode.PROTOCOL_ERROR: ("bad_frame", "the frame breaks RFC 6455 (reserved bits, opcode "
                                              "or fragmentation)"),
    WSCloseCode.INVALID_TEXT: ("bad_frame", "text frames must be UTF-8 (and are refused anyway)"),
    WSCloseCode.MESSAGE_TOO_BIG: ("message_too_big", "client messages are limited in size"),
}


class EdgeWebSocket(web.WebSocketResponse):
    """A WebSocketResponse that says why before aiohttp fails a connection on its own.

    aiohttp closes with 1002, 1007 or 1009 when a client frame breaks the protocol or the
    transport's size cap, without an application message. It calls ``close`` with an empty
    reason; the relay's own closes always give one, which is how the two are told apart.
    """

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"",
                    drain: bool = True) -> bool:
        if not message and code in FRAME_ERRORS and not self.closed:
            error_code, text = FRAME_ERRORS[code]
            try:
                await self.send_bytes(wire.error(error_code, text))
            except ConnectionError:
                pass  # the client is gone; the close below is best effort too
            message = error_code.encode()
        try:
            return await super().close(code=code, message=message, drain=drain)
        except ConnectionError:
            return False


class AdmitRate:
    """New connections per second: a token bucket holding one second's worth (the burst).

    Hand-written: a dozen lines of synchronous arithmetic on the loop's thread. An asyncio
    limiter library (aiolimiter's ``has_capacity`` then ``acquire``) would do the same as a new
    dependency; its strength, making callers wait their turn, is what an edge in a reconnect
    storm must not do: it refuses at once (4430: the client backs off seconds and may pick
    another edge) instead of holding sockets open.
    """

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = float(per_second)
        self._clock = clock
        self._tokens = self._rate
        self._at = clock()

    def take(self) -> bool:
        """One admission now, or False when this second's are used up (never with no limit)."""
        if not self._rate:
            return True
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Admission:
    """Origin allow-list, the admission rate, and connection caps per client address and per
    conversation."""

    def __init__(self, settings: Settings) -> None:
        self._origins = settings.allowed_origins
        self._per_address = settings.edge_max_per_address
        self._per_conversation = settings.edge_max_per_conversation
        self._addresses: Counter[str] = Counter()
        self._conversations: Counter[str] = Counter()
        self.rate = AdmitRate(settings.edge_admit_rate)

    def origin_allowed(self, request: web.Request) -> bool:
        """True unless an allow-list is set and the request's Origin is not on it. Requests
        without an Origin header come from native apps and servers, not browsers, and pass:
        the check protects browser users from other sites, it does not authenticate."""
        if not self._origins:
            return True
        origin = request.headers.get("Origin")
        return origin is None or normalise_origin(origin) in self._origins

    @contextmanager
    def address_slot(self, address: str) -> Iterator[bool]:
        """Count one connection from ``address`` while the block runs; yields False when the
        address already holds the maximum (the connection is then not counted)."""
        if self._per_address and self._addresses[address] >= self._per_address:
            yield False
            return
        self._addresses[address] += 1
        try:
            yield True
        finally:
            _decrement(self._addresses, address)

    @contextmanager
    def conversation_slot(self, conversation_id: str) -> Iterator[bool]:
        if (self._per_conversation
                and self._conversations[conversation_id] >= self._per_conversation):
            yield False
            return
        self._conversations[conversation_id] += 1
        try:
            yield True
        finally:
            _decrement(self._conversations, conversation_id)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # the counters stay as large as the live connections, no larger


async def refuse(ws: web.WebSocketResponse, code: int, reason: str, *,
                 error_message: str | None = None, **fields: Any) -> None:
    """Log the refusal (one line), send ``error`` when given, close with ``code``/``reason``."""
    log.info("client_refused", reason=reason, close_code=code, **fields)
    try:
        if error_message is not None:
            await ws.send_bytes(wire.error(reason, error_message))
        await ws.close(code=code, message=reason.encode())
    except ConnectionError:
        pass  # the client left first: nothing more to tell it


class ServerLog(logging.Logger):
    """The logger handed to aiohttp's HTTP protocol handler.

    aiohttp reports a malformed or oversized request with ``logger.exception``: a multi-line
    plain-text traceback whose message quotes the start of the request line, query string (and
    so the client's token) included. This logger turns each report into one structured line that
    holds only the error's class and HTTP status. Errors raised by the relay's own handlers keep
    their traceback, inside the JSON line, because those are bugs to fix.
    """

    def __init__(self) -> None:
        super().__init__("relay.edge.http")

    def _log(self, level: int, msg: object, args: Any, exc_info: Any = None,
             extra: Any = None, stack_info: bool = False, stacklevel: int = 1) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        status = getattr(exc, "code", None) if exc is not None else None
        remote = args[0] if isinstance(args, tuple) and args else None
        if exc is not None and _client_caused(exc):
            log.info("http_request_refused", error=type(exc).__name__, status=status,
                     remote=str(remote))
        elif exc is not None:
            log.error("http_handler_failed", error=type(exc).__name__, exc_info=exc)
        else:
            log.warning("http_server_event", event_text=str(msg)[:200])


def _client_caused(exc: BaseException) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError

    return isinstance(exc, HttpProcessingError | ConnectionError)


class EdgeRunner(web.AppRunner):
    """The edge's AppRunner: also logs connections closed for never completing a request.

    aiohttp's keep-alive timer closes a connection that has not delivered a complete request head
    in time (``runner_options`` sets it to the handshake timeout), silently. Such a connection is
    a refusal like any other, so it gets its one log line here, when the server is told the
    connection is gone: no request parsed, and the deadline passed (a client that hangs up early
    on its own, like a load balancer's TCP probe, is not logged).
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        forward = server.connection_lost

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            # Private fields of aiohttp's RequestHandler and Server (aiohttp is pinned; the fuzz
            # suite fails if they stop meaning this): requests parsed, when the timer fires, and
            # the connection's transport.
            deadline = getattr(handler, "_next_keepalive_close_time", 0.0)
            if (getattr(handler, "_request_count", 1) == 0 and deadline
                    and handler._loop.time() >= deadline):  # noqa: SLF001
                transport = server._connections.get(handler)  # noqa: SLF001
                log.info("http_request_timeout", remote=_peer(transport))
            forward(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign]
        return server


def _peer(transport: Any) -> str | None:
    # A transport keeps its extra info after it closed; the handler forgets it first.
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else None
