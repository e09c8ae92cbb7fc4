"""The edge's aiohttp application: the client WebSocket endpoint, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as redis
import structlog
from aiohttp import web
from prometheus_client import generate_latest
from redis.asyncio.cluster import RedisCluster

from relay import wire
from relay.edge.hub import Hub
from relay.edge.metrics import CONTENT_TYPE, EdgeMetrics
from relay.edge.routing import ClusterRouter, Router, SingleRouter
from relay.edge.session import ClientSession, choose_start
from relay.errors import InvalidConversationId, TokenError
from relay.keys import Keys, validate_conversation_id
from relay.redis_conn import RedisClient, client_for, create_client
from relay.settings import Settings
from relay.streams import valid_id
from relay.tokens import verify_token

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", Settings)
KEYS = web.AppKey("keys", Keys)
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
JOINS = web.AppKey("joins", asyncio.Semaphore)
DRAINING = web.AppKey("draining", asyncio.Event)
HUB = web.AppKey("hub", Hub)
SESSIONS: web.AppKey[set[ClientSession]] = web.AppKey("sessions")
METRICS = web.AppKey("metrics", EdgeMetrics)
HUB_TASK = web.AppKey("hub_task", object)  # _Supervised: the hub's task, restarted if it ends

# Client messages are tiny; anything far above the documented limit is cut off by aiohttp itself.
_TRANSPORT_MAX_MSG = 64 * 1024


def create_app(settings: Settings) -> web.Application:
    settings.require_secret()
    settings.require_redis()
    app = web.Application()
    app[SETTINGS] = settings
    app[KEYS] = Keys(settings.key_prefix, settings.key_buckets)
    app[SESSIONS] = set()
    app[DRAINING] = asyncio.Event()
    app[METRICS] = EdgeMetrics()
    app.cleanup_ctx.append(_redis_and_hub)
    app.on_shutdown.append(_close_sessions)
    app.router.add_get("/v1/conversations/{conversation_id}/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def _router(settings: Settings, client: RedisClient, keys: Keys) -> Router:
    if isinstance(client, RedisCluster):
        return ClusterRouter(client, keys, block_ms=settings.read_block_ms)
    # The subscriber connection is made from this client's address and credentials.
    reader = create_client(settings.require_redis(), block_ms=settings.read_block_ms,
                           max_connections=4)
    if not isinstance(reader, redis.Redis):
        raise TypeError("a single-server URL gave a cluster client")
    return SingleRouter(reader)


async def _redis_and_hub(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = client_for(settings)
    app[REDIS] = client
    # Joining clients read history; the semaphore keeps a burst of joins within the pool.
    app[JOINS] = asyncio.Semaphore(max(1, settings.redis_pool_size // 2))
    hub = Hub(_router(settings, client, app[KEYS]), app[KEYS], client,
              ping_ms=settings.read_block_ms, page=settings.read_count,
              fill_max_entries=settings.live_fill_max_entries,
              unavailable_after_s=settings.redis_unavailable_s, metrics=app[METRICS])
    app[HUB] = hub
    app[METRICS].bind(clients=lambda: len(app[SESSIONS]), conversations=lambda: hub.conversations,
                      read_loops=lambda: hub.ready_loops)
    supervised = _Supervised(hub, app[METRICS])
    app[HUB_TASK] = supervised
    log.info("edge_started", node_id=settings.node_id, cluster=settings.redis_cluster)
    try:
        yield
    finally:
        await supervised.stop()
        await client.aclose()


class _Supervised:
    """The hub's task, restarted (logged, counted) whenever it ends while the edge runs.

    The hub retries Redis failures itself; reaching the supervisor means a bug or an error
    nobody foresaw, and an edge whose hub is gone would accept clients and deliver nothing.
    """

    _RESTART_PAUSE_S = 1.0

    def __init__(self, hub: Hub, metrics: EdgeMetrics) -> None:
        self._hub = hub
        self._metrics = metrics
        self._stopping = False
        self.task = self._start()

    def _start(self) -> asyncio.Task[None]:
        task = asyncio.create_task(self._hub.run(), name="hub")
        task.add_done_callback(self._ended)
        return task

    @property
    def alive(self) -> bool:
        return not self.task.done()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        log.error("hub_ended_unexpectedly", cancelled=task.cancelled(),
                  error=repr(error) if error else None, exc_info=error,
                  restart_in_s=self._RESTART_PAUSE_S)
        self._metrics.hub_restarts.inc()
        asyncio.get_running_loop().call_later(self._RESTART_PAUSE_S, self._restart)

    def _restart(self) -> None:
        if not self._stopping:
            self.task = self._start()

    async def stop(self) -> None:
        self._stopping = True
        await self._hub.stop(self.task)


async def _close_sessions(app: web.Application) -> None:
    sessions: set[ClientSession] = app[SESSIONS]
    for session in list(sessions):
        session.request_close(wire.CloseCode.EDGE_RESTARTING, "edge_restarting")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining"}, status=503)
    try:
        await asyncio.wait_for(request.app[REDIS].ping(), 2.0)
    except (TimeoutError, OSError, redis.RedisError) as exc:
        return web.json_response({"status": "redis_unavailable", "error": str(exc)}, status=503)
    supervised = request.app[HUB_TASK]
    if not isinstance(supervised, _Supervised) or not supervised.alive:
        return web.json_response({"status": "reader_not_running"}, status=503)
    if not hub.ready:
        return web.json_response({"status": "reader_not_ready"}, status=503)
    stalled = hub.stalled(asyncio.get_running_loop().time())
    if stalled:
        return web.json_response({"status": "reader_stalled", "nodes": stalled}, status=503)
    return web.json_response({"status": "ready", "conversations": hub.conversations,
                              "clients": len(request.app[SESSIONS])})


async def metrics(request: web.Request) -> web.Response:
    request.app[HUB].flush_metrics()
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _refuse(request: web.Request, ws: web.WebSocketResponse, conversation_id: str,
                  code: int, reason: str, error: bytes | None = None) -> web.WebSocketResponse:
    """Close a connection before delivery: logged and counted with its code."""
    log.info("client_refused", code=code, reason=reason, conversation_id=conversation_id,
             peer=request.remote)
    request.app[METRICS].refused_with(code)
    if error is not None:
        await ws.send_bytes(error)
    await ws.close(code=code, message=reason.encode())
    return ws


def _token_from(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("token")


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    ws = web.WebSocketResponse(max_msg_size=_TRANSPORT_MAX_MSG, heartbeat=settings.heartbeat_s)
    await ws.prepare(request)
    conversation_id = request.match_info["conversation_id"]
    if app[DRAINING].is_set():
        return await _refuse(request, ws, conversation_id, wire.CloseCode.EDGE_RESTARTING,
                             "edge_draining")
    try:
        validate_conversation_id(conversation_id)
        verify_token(settings.require_secret(), _token_from(request), conversation_id)
    except TokenError as exc:
        return await _refuse(request, ws, conversation_id, exc.close_code, exc.reason)
    except InvalidConversationId as exc:
        return await _refuse(request, ws, conversation_id[:64], wire.CloseCode.BAD_REQUEST,
                             "bad_conversation_id", wire.error("bad_conversation_id", str(exc)))
    last_id = request.query.get("last_id") or None
    if last_id is not None and not valid_id(last_id):
        return await _refuse(request, ws, conversation_id, wire.CloseCode.BAD_REQUEST,
                             "bad_last_id",
                             wire.error("bad_last_id", "last_id must look like <ms>-<seq>"))
    with structlog.contextvars.bound_contextvars(conversation_id=conversation_id,
                                                 peer=request.remote):
        await _serve(app, ws, conversation_id, last_id)
    return ws


async def _serve(
    app: web.Application, ws: web.WebSocketResponse, conversation_id: str, last_id: str | None
) -> None:
    settings, hub = app[SETTINGS], app[HUB]
    session = ClientSession(ws, conversation_id, settings, app[METRICS])
    app[SESSIONS].add(session)
    reader: asyncio.Task[None] | None = None
    try:
        async with app[JOINS]:
            start, tip = await choose_start(app[REDIS], app[KEYS], conversation_id, last_id)
        position, _ = hub.attach(conversation_id, session, tip)
        await ws.send_bytes(wire.welcome(
            conversation=conversation_id, edge=settings.node_id, start=start.mode,
            recovered=start.recovered, position=start.position,
        ))
        log.info("client_joined", start=start.mode, recovered=start.recovered)
        app[METRICS].joined(start.mode, start.recovered)
        reader = asyncio.create_task(session.read_client(), name="client-reader")
        reader.add_done_callback(lambda _: session.request_close(wire.CloseCode.NORMAL, "bye"))
        await session.catch_up(app[REDIS], app[KEYS], start, position, app[JOINS])
        await session.pump()
    except (TimeoutError, ConnectionResetError) as exc:
        log.info("client_lost", error=type(exc).__name__)
    except redis.RedisError as exc:
        log.warning("client_redis_error", error=str(exc))
        await ws.close(code=wire.CloseCode.UNAVAILABLE, message=b"redis_unavailable")
    finally:
        hub.detach(conversation_id, session)
        app[SESSIONS].discard(session)
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        app[METRICS].disconnected(session.close_code)
        log.info("client_left", sent=session.sent_count, code=session.close_code,
                 reason=session.close_reason)
