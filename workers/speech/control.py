"""The interrupt fast path: producers hear about interrupts on conversations' control channels."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

import structlog
from redis.asyncio.client import PubSub
from redis.exceptions import RedisClusterException, RedisError

from relay.keys import Keys
from relay.redis_conn import RedisClient, pubsub_client

log = structlog.get_logger(__name__)

_RECONNECT_FIRST_S = 0.1
_RECONNECT_MAX_S = 5.0


class ControlListener:
    """PSUBSCRIBE to every conversation's control channel; hands (conversation, turn) to a callback.

    It only speeds things up: a turn that misses a message (Redis hiccup) still stops at its next
    fenced write, or when waiting for frames runs into the stall timeout.
    """

    def __init__(self, client: RedisClient, keys: Keys, on_interrupt: Any,
                 alive_channel: str | None = None) -> None:
        self._alive_channel = alive_channel
        self._client = pubsub_client(client)
        self._owns_client = self._client is not client
        self._keys = keys
        self._on_interrupt = on_interrupt
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pubsub = await self._subscribe()
        self._task = asyncio.create_task(self._run(), name="control-listener")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.error("control_listener_failed", exc_info=task.exception())
        await self._drop()
        if self._owns_client:
            await self._client.aclose()

    async def _subscribe(self) -> PubSub:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(self._keys.control_pattern())
            if self._alive_channel is not None:
                # The same connection proves this process alive to the session-lease scripts.
                await pubsub.subscribe(self._alive_channel)
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise
        return pubsub

    async def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _run(self) -> None:
        delay = _RECONNECT_FIRST_S
        while True:
            try:
                if self._pubsub is None:
                    self._pubsub = await self._subscribe()
                    log.info("control_channel_resubscribed")
                message = await self._pubsub.get_message(timeout=1.0)
                delay = _RECONNECT_FIRST_S
            except (RedisError, RedisClusterException, OSError) as exc:
                log.warning("control_channel_lost", error=str(exc), retry_in_s=delay)
                await self._drop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)
                continue
            if message is not None and message.get("type") == "pmessage":
                try:
                    self._dispatch(message["channel"], message["data"])
                except Exception:
                    # A bug in one message's handling must not end the listener: without it,
                    # interrupts would reach this process's turns only through their fences.
                    log.exception("control_message_failed")

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        conversation_id = self._keys.conversation_of_control(channel.decode(errors="replace"))
        if conversation_id is not None:
            self._on_interrupt(conversation_id, data.decode(errors="replace"))
