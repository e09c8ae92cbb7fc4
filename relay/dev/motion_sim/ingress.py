"""The ingress endpoint ``GET /v2/driveningress/websocket?id=<avatar_id>``: upgrade and handshake.

Auth by headers ``X-App-ID`` and ``X-Session-Key`` or by query ``appId`` and ``sessionKey``;
binary protobuf after the upgrade. A ``Connection`` answers the ClientConfigureSession, hands a
confirmed session to ``Session`` and performs whatever ending that decides.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf.message import DecodeError

from relay.dev.motion_sim import proto
from relay.dev.motion_sim.faults import FaultKind
from relay.dev.motion_sim.messages import (
    CLIENT_GONE,
    INVALID_ARGUMENT,
    TEXT_ONLY,
    Ending,
    close_reason,
    new_id,
    server_confirm,
    server_error,
)
from relay.dev.motion_sim.session import Session
from relay.dev.motion_sim.sim import SIM_KEY, MotionSim

log = structlog.get_logger(__name__)

SAMPLE_RATES = frozenset({8000, 16000, 22050, 24000, 32000, 44100, 48000})
HANDSHAKE_TIMEOUT_S = 10.0  # the SDK gives up after the same time


def _message_response(status: int, message: str) -> web.Response:
    # Same shape as the production upgrade rejections, trailing newline included.
    body = json.dumps({"message": message}, separators=(",", ":")) + "\n"
    return web.Response(status=status, text=body, content_type="application/json")


def _credentials(request: web.Request) -> tuple[str, str]:
    headers, query = request.headers, request.query
    if "X-Session-Key" in headers:
        return headers.get("X-App-ID", ""), headers["X-Session-Key"]
    return query.get("appId", ""), query.get("sessionKey", "")


def _check_upgrade(sim: MotionSim, request: web.Request) -> web.Response | None:
    """The HTTP answer that refuses the upgrade, or None to accept it."""
    avatar_id = request.query.get("id", "")
    fault = sim.take_fault(frozenset({FaultKind.REJECT_UPGRADE}), avatar_id)
    if fault is not None:
        return _message_response(fault.status or 400, fault.message or "Invalid session token")
    app_id, token = _credentials(request)
    if not app_id or not sim.token_ok(token):
        return _message_response(400, "Invalid session token")
    sim.token_used(token)
    known = sim.config.known_avatars
    if not avatar_id or (known and avatar_id not in known):
        return _message_response(404, "Avatar not found")
    return None


async def handle_ingress(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    rejection = _check_upgrade(sim, request)
    if rejection is not None:
        return rejection
    # No permessage-deflate: payloads stay byte-identical and sends never await a compressor.
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    app_id, _ = _credentials(request)
    sim.track(ws)
    try:
        await Connection(sim, ws, request, app_id, request.query["id"]).run()
    finally:
        sim.untrack(ws)
    return ws


class Connection:
    """One ingress WebSocket: the handshake, then a ``Session``, then the ending it decided."""

    def __init__(
        self,
        sim: MotionSim,
        ws: web.WebSocketResponse,
        request: web.Request,
        app_id: str,
        avatar_id: str,
    ) -> None:
        self._sim = sim
        self._config = sim.config
        self._ws = ws
        self._transport = request.transport
        self._app_id = app_id
        self._avatar_id = avatar_id
        self._connection_id = new_id()
        self._log = log.bind(connection_id=self._connection_id, app_id=app_id, avatar_id=avatar_id)
        self._session: Session | None = None  # set once the session holds a concurrency slot

    async def run(self) -> None:
        try:
            outcome = await self._handshake()
            if isinstance(outcome, Session):
                self._log.info("session opened", sample_rate=outcome.sample_rate)
                outcome = await outcome.serve()
            await self._finish(outcome)
        except ConnectionError:
            self._log.info("client went away")
        finally:
            if self._session is not None:  # holds a concurrency slot
                self._sim.release_session(self._app_id)
                self._log.info("session closed", keyframes_sent=self._session.keyframes_sent)

    async def _handshake(self) -> Ending | Session:
        """Answer the ClientConfigureSession; the Session once it is confirmed."""
        configure = await self._receive_configure()
        if configure is None:
            return self._reject(TEXT_ONLY, "expected ClientConfigureSession message")
        if self._sim.take_fault(frozenset({FaultKind.HANDSHAKE_SILENCE}), self._avatar_id):
            return await self._ignore_until_closed()
        if configure.audio_format != proto.AudioFormat.PCM_S16LE:
            return self._reject(INVALID_ARGUMENT, "unsupported audio format: only PCM_S16LE")
        if configure.sample_rate not in SAMPLE_RATES:
            return self._reject(TEXT_ONLY, f"unsupported sample rate: {configure.sample_rate}")
        if self._config.handshake_delay_ms:
            await asyncio.sleep(self._config.handshake_delay_ms / 1000)
        if not self._sim.try_open_session(self._app_id):
            code = proto.CloseCode.CONCURRENCY_LIMIT
            return self._reject(code, "concurrency limit exceeded", close_code=code)
        # Recorded before the confirm is sent: if that send fails, run() still frees the slot.
        self._session = Session(
            self._sim,
            self._ws,
            send=self._send,
            connection_id=self._connection_id,
            avatar_id=self._avatar_id,
            sample_rate=configure.sample_rate,
            log=self._log,
        )
        await self._send(server_confirm(self._connection_id))
        return self._session

    async def _receive_configure(self) -> Any:
        try:
            msg = await self._ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            return None
        if msg.type is not WSMsgType.BINARY:
            return None
        envelope = proto.Message()
        try:
            envelope.ParseFromString(msg.data)
        except DecodeError:
            return None
        if envelope.type != proto.MessageType.CLIENT_CONFIGURE_SESSION:
            return None
        return envelope.client_configure_session

    async def _ignore_until_closed(self) -> Ending:
        # Bounded so a client that never gives up cannot pin the handler forever.
        limit = self._config.idle_timeout_s or HANDSHAKE_TIMEOUT_S
        with suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while not self._ws.closed:
                    msg = await self._ws.receive()
                    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                        break
        return CLIENT_GONE

    def _reject(
        self, code: int, message: str, *, close_code: int = WSCloseCode.POLICY_VIOLATION
    ) -> Ending:
        self._log.info("session rejected", reason=message)
        error = server_error(code, message, self._connection_id)
        return Ending(close_code=close_code, reason=message, error=error)

    async def _finish(self, ending: Ending) -> None:
        if ending.abort:
            if self._transport is not None:
                self._transport.abort()
            return
        if ending.error is not None:
            with suppress(ConnectionError):
                await self._send(ending.error)
        await self._ws.close(code=ending.close_code, message=close_reason(ending.reason))

    async def _send(self, payload: bytes) -> None:
        await self._ws.send_bytes(payload)
        self._sim.stats.messages_sent += 1
