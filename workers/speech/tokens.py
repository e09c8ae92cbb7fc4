"""Session tokens fetched before they are needed, each handed to exactly one SDK session.

Opening an SDK session costs a console round trip for its token before the WebSocket handshake.
``TokenStock`` keeps up to ``size`` fresh tokens, so a new session skips that trip. The Spatius
docs call a session token single-use ("Ensure a new token is used for each connection"), so a
stocked token goes to one session and is then gone. (The SDK's own prefetch,
``spatius.prewarm(prefetch_session_token=True)``, caches one token for every later session, which
those docs do not allow; so it is not used.)

A token reaches the SDK through the SDK's own token cache, which ``AvatarSession.init`` reads:
store, init, clear, under one lock per event loop, so no other session's init sees it. Only
sessions opened with explicit endpoints (the simulator, or ``SPATIUS_CONSOLE_URL`` and
``SPATIUS_INGRESS_URL``) use the stock: the cache is keyed by the console URL, which for
``SPATIUS_REGION`` alone is only known inside the SDK.

Cost: tokens count against neither the session cap nor billing (metering starts when a session
is confirmed); an unused one is dropped after ``STOCK_MAX_AGE_S`` and replaced, so an idle
producer fetches about ``size`` tokens every two minutes.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import spatius
import structlog
from spatius.avatar_session import fetch_session_token
from spatius.session_config import SessionConfig
from spatius.token_cache import clear_cached_session_tokens, store_session_token

from workers.speech.endpoints import MotionEndpoints
from workers.speech.periodic import Periodic

log = structlog.get_logger(__name__)

# A stocked token is used within this long of its fetch or dropped. Sessions are recycled
# SESSION_TOKEN_TTL - 5 min after they open, so a token this old still outlives its session.
STOCK_MAX_AGE_S = 120.0
_REFILL_S = 1.0  # the stock is topped up this often (and at once after a take)

_handoff: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expire_at: datetime
    fetched_at: float  # event loop time


class TokenStock:
    """Up to ``size`` unused session tokens; ``size`` 0 (or no explicit endpoints) turns it off."""

    def __init__(self, endpoints: MotionEndpoints, *, size: int, ttl: timedelta) -> None:
        self._endpoints = endpoints
        self._size = size if endpoints.console_url and endpoints.ingress_url else 0
        self._ttl = ttl
        self._tokens: deque[Token] = deque()
        self._refill = Periodic("sdk-token-stock", _REFILL_S, self.top_up)
        self._wake: asyncio.Task[None] | None = None
        self.fetched = 0

    @property
    def enabled(self) -> bool:
        return self._size > 0

    def __len__(self) -> int:
        return len(self._tokens)

    def start(self) -> None:
        if self.enabled:
            self._refill.start()

    async def close(self) -> None:
        await self._refill.close()
        if self._wake is not None:
            self._wake.cancel()
            await asyncio.wait({self._wake})
        self._tokens.clear()

    async def take(self) -> Token:
        """A fresh token from the stock, or one fetched now when it is empty (SDK errors
        propagate, as from ``init``). Only when ``enabled``."""
        loop = asyncio.get_running_loop()
        while self._tokens:
            token = self._tokens.popleft()
            if loop.time() - token.fetched_at < STOCK_MAX_AGE_S:
                self._top_up_soon()
                return token
        self._top_up_soon()
        return await self._fetch()

    async def top_up(self) -> None:
        """Drop tokens too old to hand out, then fetch until ``size`` are ready; a failure is
        logged and retried at the next tick (the sessions then fetch their own)."""
        loop = asyncio.get_running_loop()
        while self._tokens and loop.time() - self._tokens[0].fetched_at >= STOCK_MAX_AGE_S:
            self._tokens.popleft()
        try:
            while len(self._tokens) < self._size:
                self._tokens.append(await self._fetch())
        except (spatius.AvatarSDKError, ValueError, OSError) as exc:
            log.warning("sdk_token_prefetch_failed", error=type(exc).__name__)

    def _top_up_soon(self) -> None:
        if self.enabled and (self._wake is None or self._wake.done()):
            self._wake = asyncio.create_task(self.top_up(), name="sdk-token-top-up")

    async def _fetch(self) -> Token:
        expire_at = datetime.now(UTC) + self._ttl
        config = SessionConfig(api_key=self._endpoints.api_key, app_id=self._endpoints.app_id,
                               console_endpoint_url=self._endpoints.console_url,
                               expire_at=expire_at)
        value = await fetch_session_token(config)
        self.fetched += 1
        return Token(value, expire_at, asyncio.get_running_loop().time())


async def init_with(token: Token, endpoints: MotionEndpoints,
                    init: Callable[[], Awaitable[None]]) -> None:
    """Run an SDK session's ``init`` with ``token`` in the SDK's token cache, and only for it."""
    loop = asyncio.get_running_loop()
    lock = _handoff.setdefault(loop, asyncio.Lock())
    async with lock:
        store_session_token(api_key=endpoints.api_key, app_id=endpoints.app_id,
                            console_endpoint_url=endpoints.console_url, token=token.value,
                            expire_at=token.expire_at)
        try:
            await init()
        finally:
            clear_cached_session_tokens()
