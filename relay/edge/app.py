"""The edge's aiohttp application: the client WebSocket endpoint, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as redis
import structlog
from aiohttp import web
from prometheus_client import generate_latest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay import wire
from relay.build import relay_version
from relay.edge.admission import Admission, EdgeWebSocket, ServerLog, refuse
from relay.edge.hub import Hub
from relay.edge.metrics import CONTENT_TYPE, EdgeMetrics
from relay.edge.routing import ClusterRouter, Router, SingleRouter
from relay.edge.session import ClientSession, StartPoint, choose_start
from relay.errors import InvalidConversationId, TokenError
from relay.keys import Keys, validate_conversation_id
from relay.redis_conn import RedisClient, client_for, create_client
from relay.settings import Settings
from relay.streams import valid_id
from relay.tokens import TokenVerifier, verifier_from_settings

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
VERIFIER = web.AppKey("verifier", TokenVerifier)
ADMISSION = web.AppKey("admission", Admission)

# Client messages are tiny; anything far above the documented limit is cut off by aiohttp itself.
_TRANSPORT_MAX_MSG = 64 * 1024


def create_app(settings: Settings) -> web.Application:
    settings.require_redis()
    app = web.Application()
    app[SETTINGS] = settings
    app[VERIFIER] = verifier_from_settings(settings)
    app[ADMISSION] = Admission(settings)
    app[KEYS] = Keys.of(settings)
    app[SESSIONS] = set()
    app[DRAINING] = asyncio.Event()
    app[METRICS] = EdgeMetrics()
    app.cleanup_ctx.append(_redis_and_hub)
    app.on_shutdown.append(_close_sessions)
    # Any segment, braces and all, reaches the handler: every id the rule refuses gets the
    # documented error and 4400, not a router 404 a browser cannot see.
    app.router.add_get("/v1/conversations/{conversation_id:[^/]*}/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    _add_web_demo(app, settings)
    return app


def _add_web_demo(app: web.Application, settings: Settings) -> None:
    """The demo page and the web client as static files at /demo/ (RELAY_WEB_DEMO, for
    `relay run`). Paths only: the edge imports nothing of the dev tooling."""
    if not settings.web_demo:
        return
    package = Path(__file__).resolve().parent.parent
    page = package / "dev" / "webdemo" / "page"

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(page / "index.html")

    async def to_index(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.rel_url.with_path("/demo/"))

    app.router.add_get("/demo", to_index)
    app.router.add_get("/demo/", index)
    app.router.add_static("/demo/lib/", package / "client" / "web")
    app.router.add_static("/demo/", page)


def runner_options(settings: Settings) -> dict[str, Any]:
    """aiohttp server options every edge runs with (relay.edge.run and the tests alike)."""
    return {
        # aiohttp's keep-alive timer also runs from the moment a connection opens until a
        # complete request head has arrived, whatever trickles in meanwhile: it is the header
        # read deadline. It is also how long an idle keep-alive HTTP connection stays open.
        "keepalive_timeout": settings.edge_handshake_timeout_s,
        "max_line_size": settings.edge_max_request_line,
        "max_field_size": settings.edge_max_header_bytes,
        "lingering_time": min(2.0, settings.edge_handshake_timeout_s),
        "logger": ServerLog(),
        "access_log": None,
    }


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
    log.info("edge_started", node_id=settings.node_id, cluster=settings.redis_cluster,
             version=relay_version())
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
    except (TimeoutError, OSError, redis.RedisError, RedisClusterException) as exc:
        # RedisClusterException: a cluster client with no node reachable (not a RedisError).
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


async def _refuse(request: web.Request, ws: web.WebSocketResponse, code: int, reason: str, *,
                  error_message: str | None = None, **fields: Any) -> None:
    """Close a connection before delivery: one log line, counted with its code."""
    request.app[METRICS].refused_with(code)
    await refuse(ws, code, reason, error_message=error_message, peer=request.remote, **fields)


class _AmbiguousToken(TokenError):
    pass


def _token_from(request: web.Request) -> str | None:
    """The Authorization header wins over the query parameter (docs/protocol.md)."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    tokens = request.query.getall("token", [])
    if len(tokens) > 1:
        raise _AmbiguousToken("several token parameters")
    return tokens[0] if tokens else None


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, admission = app[SETTINGS], app[ADMISSION]
    if not admission.origin_allowed(request):
        # Before the upgrade: a page on another site never gets a WebSocket at all.
        log.info("client_refused", reason="origin_not_allowed", status=403)
        request.app[METRICS].refused_with(403)
        raise web.HTTPForbidden(text="origin not allowed\n")
    ws = EdgeWebSocket(max_msg_size=_TRANSPORT_MAX_MSG, heartbeat=settings.heartbeat_s,
                       timeout=settings.edge_handshake_timeout_s, compress=False)
    try:
        await ws.prepare(request)
    except web.HTTPException as exc:  # not a WebSocket upgrade: aiohttp answers 400 itself
        log.info("client_refused", reason="not_a_websocket", status=exc.status)
        request.app[METRICS].refused_with(exc.status)
        raise
    if not admission.rate.take():
        # Before the token check and any Redis read: refusing costs the edge next to nothing.
        await _refuse(request, ws, wire.CloseCode.TOO_MANY_CONNECTIONS, "too_many_connections",
                      scope="rate", error_message="this edge is taking no more connections "
                      "this second; back off and retry, or try another edge")
        return ws
    with admission.address_slot(request.remote or "") as admitted:
        if not admitted:
            await _refuse(request, ws, wire.CloseCode.TOO_MANY_CONNECTIONS,
                          "too_many_connections", scope="address",
                          error_message="too many connections from this address")
            return ws
        await _admit(request, ws)
    return ws


async def _admit(request: web.Request, ws: web.WebSocketResponse) -> None:
    app = request.app
    conversation_id = request.match_info["conversation_id"]
    try:
        validate_conversation_id(conversation_id)
    except InvalidConversationId as exc:
        # The refused id itself is not logged: it is whatever the client put in the path.
        await _refuse(request, ws, wire.CloseCode.BAD_REQUEST, "bad_conversation_id",
                      error_message=str(exc), id_length=len(conversation_id))
        return
    if app[DRAINING].is_set():
        await _refuse(request, ws, wire.CloseCode.EDGE_RESTARTING, "edge_draining",
                      conversation_id=conversation_id)
        return
    try:
        claims = app[VERIFIER].verify(_token_from(request), conversation_id)
    except TokenError as exc:
        # Refused tokens close before any message (docs/protocol.md); ``detail`` is fixed text.
        await _refuse(request, ws, exc.close_code, exc.reason, detail=str(exc),
                      conversation_id=conversation_id)
        return
    last_id = request.query.get("last_id") or None
    if last_id is not None and not valid_id(last_id):
        await _refuse(request, ws, wire.CloseCode.BAD_REQUEST, "bad_last_id",
                      error_message="last_id must look like <ms>-<seq>",
                      conversation_id=conversation_id)
        return
    with app[ADMISSION].conversation_slot(conversation_id) as admitted, \
            structlog.contextvars.bound_contextvars(conversation_id=conversation_id,
                                                    peer=request.remote):
        if not admitted:
            await _refuse(request, ws, wire.CloseCode.TOO_MANY_CONNECTIONS,
                          "too_many_connections", scope="conversation",
                          error_message="too many connections to this conversation")
            return
        deadline = claims.expires_at + app[VERIFIER].leeway_s
        await _serve(app, ws, conversation_id, last_id, deadline)


async def _placed(app: web.Application, conversation_id: str,
                  last_id: str | None) -> tuple[StartPoint, str]:
    """Where the client starts; a Redis that does not answer within RELAY_REDIS_UNAVAILABLE_S
    counts as unavailable, as for the clients already attached."""
    try:
        async with asyncio.timeout(app[SETTINGS].redis_unavailable_s), app[JOINS]:
            return await choose_start(app[REDIS], app[KEYS], conversation_id, last_id)
    except TimeoutError as exc:
        raise RedisTimeoutError("no answer from Redis while placing the client") from exc


# Replies by which Redis says it cannot serve now (busy script, failover in progress): redis-py
# raises some as their own classes (without the code in the text), others as ResponseError.
_UNAVAILABLE_ERRORS = (ReadOnlyError, ClusterDownError, TryAgainError, MasterDownError)
_UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY")


def _means_unavailable(exc: redis.RedisError | RedisClusterException) -> bool:
    if not isinstance(exc, ResponseError) or isinstance(exc, _UNAVAILABLE_ERRORS):
        return True  # connection errors, timeouts, loading
    return str(exc).startswith(_UNAVAILABLE_REPLIES)


async def _serve(
    app: web.Application, ws: web.WebSocketResponse, conversation_id: str, last_id: str | None,
    token_deadline: float,
) -> None:
    settings, hub = app[SETTINGS], app[HUB]
    session = ClientSession(ws, conversation_id, settings, app[METRICS])
    app[SESSIONS].add(session)
    reader: asyncio.Task[None] | None = None
    # The token holds for the connection's whole life, not only at connect: when it expires the
    # client gets error{token_expired} and 4402, fetches a new token and resumes with last_id.
    expiry = asyncio.get_running_loop().call_later(
        max(0.0, token_deadline - time.time()), session.request_close,
        wire.CloseCode.TOKEN_EXPIRED, "token_expired", "the token expired; reconnect with a new "
        "token and last_id")
    try:
        start, tip = await _placed(app, conversation_id, last_id)
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
    except (redis.RedisError, RedisClusterException) as exc:
        # Client input never reaches Redis unchecked, so a command Redis refuses is a fault of
        # the relay (1011), not an outage: only errors that mean "Redis is not serving" are 4503
        # (RedisClusterException: no cluster node reachable).
        unavailable = _means_unavailable(exc)
        log.warning("client_redis_error", error=str(exc), unavailable=unavailable)
        code, reason = ((wire.CloseCode.UNAVAILABLE, "redis_unavailable") if unavailable
                        else (wire.CloseCode.INTERNAL_ERROR, "internal_error"))
        session.request_close(code, reason)  # what client_left and the metrics report
        with contextlib.suppress(ConnectionError):
            await ws.close(code=code, message=reason.encode())
    finally:
        expiry.cancel()
        hub.detach(conversation_id, session)
        app[SESSIONS].discard(session)
        if reader is not None:
            reader.cancel()
            # A reader that lost its connection has nothing left to report.
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await reader
        app[METRICS].disconnected(session.close_code)
        log.info("client_left", sent=session.sent_count, code=session.close_code,
                 reason=session.close_reason)
