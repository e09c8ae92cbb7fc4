"""Async Python client for the edge protocol: yields messages in order, reconnects and resumes.

    async with RelayClient(["ws://edge-a:8080", "ws://edge-b:8080"], "conv-1", token) as client:
        async for message in client.messages():
            ...

Each message from a conversation stream carries ``id``; the client remembers the last one and
sends it as ``last_id`` when it reconnects (to the next edge in the list), so it gets exactly what
it missed. Ids at or below the last seen one are dropped, so nothing is yielded twice.

Tokens expire, also during a connection: the edge then sends ``error{token_expired}`` and closes
with 4402. Give ``refresh_token`` (or pass ``token`` as a callable, called for every connection)
and the client fetches a new token and resumes at once with ``last_id``, losing nothing; the
same happens once on 4401 (a key retired by rotation). Without one, 4401 and 4402 raise
RelayClientError. The token travels in the ``Authorization`` header, never in the URL. After
4430 (too many connections) it waits seconds (2 s, doubling to 30 s), not milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from urllib.parse import quote

import aiohttp
import structlog

from relay import wire
from relay.client.avatarkit import StreamPosition
from relay.errors import RelayError

log = structlog.get_logger(__name__)

_ENDED = (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)

TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]
_CROWDED_FIRST_S = 2.0
_CROWDED_MAX_S = 30.0
TokenRefresh = Callable[[], str] | Callable[[], Awaitable[str]]


class _TokenRefused(Exception):
    """The edge refused or expired the token; a fresh one may cure it."""


class RelayClientError(RelayError):
    """The edge refused the client for a reason reconnecting cannot fix (see docs/protocol.md)."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(f"edge closed the connection with {close_code} ({reason})")
        self.close_code = close_code
        self.reason = reason


class RelayClient:
    def __init__(
        self,
        edges: str | list[str],
        conversation_id: str,
        token: TokenSource,
        *,
        last_id: str | None = None,
        reconnect: bool = True,
        max_backoff_s: float = 2.0,
        max_attempts: int = 0,
        refresh_token: TokenRefresh | None = None,
    ) -> None:
        self._edges = [edges] if isinstance(edges, str) else list(edges)
        if not self._edges:
            raise ValueError("at least one edge URL is required")
        self.conversation_id = conversation_id
        self._token = token
        self._refresh = refresh_token if refresh_token is not None else (
            token if callable(token) else None)
        self._stale_token = False  # fetch a new token before the next connection
        self._refreshed_since_welcome = False
        self._crowded = 0  # 4430 refusals since the last welcome
        self.token_refreshes = 0
        self._position = StreamPosition(last_id)
        self._reconnect = reconnect
        self._max_backoff_s = max_backoff_s
        self._max_attempts = max_attempts
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._edge_index = 0
        self.connections = 0
        self.welcomes: list[wire.Message] = []
        self.close_codes: list[int | None] = []
        self._closed = False

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def drop_connection(self) -> None:
        """Abort the current connection (tests use it to simulate a network drop)."""
        if self._ws is not None and self._ws._conn is not None:  # noqa: SLF001 - test hook
            self._ws._conn.transport.abort()  # type: ignore[union-attr]

    async def messages(self) -> AsyncIterator[wire.Message]:
        """Messages and welcomes, in order, across reconnects, until close() or a fatal code."""
        failures = 0
        while True:
            try:
                async for message in self._one_connection():
                    failures = 0
                    yield message
            except _TokenRefused:
                continue  # straight back to the same edge with a new token and last_id
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.debug("relay_client_connect_failed", error=str(exc))
            if not self._reconnect or self._closed:
                return
            failures += 1
            if self._max_attempts and failures >= self._max_attempts:
                raise RelayClientError(0, "edges unreachable")
            self._edge_index = (self._edge_index + 1) % len(self._edges)
            await asyncio.sleep(self._backoff_s(failures))

    async def _one_connection(self) -> AsyncIterator[wire.Message]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url, token = self._url(), await self._token_now()
        headers = {"Authorization": f"Bearer {token}"}
        async with self._session.ws_connect(url, max_msg_size=0, autoping=True,
                                            headers=headers) as ws:
            self._ws = ws
            self.connections += 1
            reason = ""
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.CLOSE:
                    reason = str(msg.extra or "")
                    break
                if msg.type in _ENDED:
                    break
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                message = wire.decode_server(msg.data)
                if message.kind == wire.PONG:
                    continue
                if message.kind == wire.WELCOME:
                    self.welcomes.append(message)
                    self._refreshed_since_welcome = False
                    self._crowded = 0
                elif not self._position.accept(message):
                    continue
                yield message
            self._ws = None
            code = ws.close_code
            self.close_codes.append(code)
            if code == wire.CloseCode.TOO_MANY_CONNECTIONS:
                self._crowded += 1
            if (code in wire.CloseCode.REFRESH_TOKEN and self._refresh is not None
                    and not self._refreshed_since_welcome):
                # One new token per accepted connection: a token refused again right after a
                # refresh is a configuration problem that retrying cannot fix.
                self._stale_token = self._refreshed_since_welcome = True
                raise _TokenRefused
            if code in wire.CloseCode.FATAL:
                raise RelayClientError(code or 0, reason)

    @property
    def last_id(self) -> str | None:
        """The id of the last stream message yielded: what a reconnect sends as ``last_id``."""
        return self._position.last_id

    def _backoff_s(self, failures: int) -> float:
        """Capped exponential backoff; after 4430 (too many connections) seconds, not
        milliseconds: the edge is refusing on purpose (docs/protocol.md)."""
        delay = min(self._max_backoff_s, 0.05 * 2.0 ** min(failures, 6))
        if self._crowded:
            crowded = _CROWDED_FIRST_S * 2.0 ** min(self._crowded - 1, 8)
            delay = max(delay, min(_CROWDED_MAX_S, crowded))
        return float(delay)

    async def _token_now(self) -> str:
        source: TokenSource | None = self._token
        if self._stale_token:
            source, self._stale_token = self._refresh, False
            self.token_refreshes += 1
        if callable(source):
            value = source()
            source = await value if isinstance(value, Awaitable) else value
        if callable(self._token) or source is None:
            return str(source)
        self._token = source  # the refreshed token serves the following connections too
        return source

    def _url(self) -> str:
        base = self._edges[self._edge_index].rstrip("/")
        conversation = quote(self.conversation_id, safe="")
        url = f"{base}/v1/conversations/{conversation}/ws"
        if self.last_id:
            url += f"?last_id={quote(self.last_id)}"
        return url

    async def ping(self, nonce: int = 0) -> None:
        if self._ws is not None:
            with contextlib.suppress(ConnectionResetError):
                await self._ws.send_bytes(wire.ping(nonce))
