"""A confirmed ingress session: a reader, a writer and one emitter per request.

The reader never waits on output, so interrupts are seen while requests are being paced.
Emitters hand finished messages to the writer through a bounded queue, and the writer is the
only task that sends. The first component to decide the session's fate resolves ``_ending``;
``serve`` then cancels every task and returns that ending for the connection to perform.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from operator import itemgetter
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf.message import DecodeError
from structlog.typing import FilteringBoundLogger

from relay.dev.motion_sim import proto
from relay.dev.motion_sim.animation import FPS, encode_animation
from relay.dev.motion_sim.batching import Outbound, RequestBuffer
from relay.dev.motion_sim.faults import RUNTIME_FAULTS, FaultKind
from relay.dev.motion_sim.messages import (
    CLIENT_GONE,
    INTERNAL,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    TEXT_ONLY,
    Ending,
    server_error,
)
from relay.dev.motion_sim.sim import MotionSim

OUTBOUND_QUEUE_SIZE = 32  # messages per connection waiting for the socket
MAX_ACTIVE_REQUESTS = 16  # concurrently streaming req_ids per connection
MAX_PENDING_KEYFRAMES = 60 * FPS  # audio a request may run ahead of its (paced) animation
RETIRED_REQUEST_IDS = 256  # finished req_ids remembered per connection to ignore late audio


async def _cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel and await tasks; asyncio.wait never swallows a cancellation of the caller."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


class Session:
    """The running phase of one connection, from the confirmed handshake to its ending."""

    def __init__(
        self,
        sim: MotionSim,
        ws: web.WebSocketResponse,
        *,
        send: Callable[[bytes], Awaitable[None]],
        connection_id: str,
        avatar_id: str,
        sample_rate: int,
        log: FilteringBoundLogger,
    ) -> None:
        self._sim = sim
        self._config = sim.config
        self._ws = ws
        self._send = send  # the connection's, so every message is counted in one place
        self._connection_id = connection_id
        self._avatar_id = avatar_id
        self.sample_rate = sample_rate
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._ending: asyncio.Future[Ending] = self._loop.create_future()
        self._outbound: asyncio.Queue[Outbound] = asyncio.Queue(OUTBOUND_QUEUE_SIZE)
        self._requests: dict[str, RequestBuffer] = {}
        self._retired: OrderedDict[str, None] = OrderedDict()
        self._started_at = self._last_audio_at = self._loop.time()
        self._keyframes_sent = 0
        self._stalled = False

    @property
    def keyframes_sent(self) -> int:
        return self._keyframes_sent

    async def serve(self) -> Ending:
        """Stream until the first component decides the ending; every task is gone on return."""
        reader = asyncio.create_task(self._read_loop(), name=f"sim-read-{self._connection_id}")
        writer = asyncio.create_task(self._write_loop(), name=f"sim-write-{self._connection_id}")
        waiters: list[asyncio.Future[Any]] = [self._ending, reader, writer]
        try:
            # Both loops decide the ending before they return, unless they crash.
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, writer):
                if task.done() and task.exception() is not None:
                    self._log.error("connection task failed", exc_info=task.exception())
                    self._end(Ending(WSCloseCode.INTERNAL_ERROR, "internal error"))
            return self._ending.result()
        finally:
            emitters = [r.emitter for r in self._requests.values() if r.emitter is not None]
            await _cancel([reader, writer, *emitters])

    def _end(self, ending: Ending) -> None:
        if not self._ending.done():
            self._ending.set_result(ending)

    # Reader.

    async def _read_loop(self) -> None:
        while True:
            deadline = self._next_deadline()
            timeout = None
            if deadline is not None:
                due, on_expiry = deadline
                timeout = due - self._loop.time()
                if timeout <= 0:
                    self._end(on_expiry())
                    return
            try:
                msg = await self._ws.receive(timeout=timeout)
            except TimeoutError:
                continue  # the deadline check above decides what expired
            if msg.type is WSMsgType.BINARY:
                await self._on_message(msg.data)
            elif msg.type is WSMsgType.TEXT:
                self._log.warning("text frame ignored")
            else:
                self._end(CLIENT_GONE)
                return

    def _next_deadline(self) -> tuple[float, Callable[[], Ending]] | None:
        config = self._config
        deadlines: list[tuple[float, Callable[[], Ending]]] = []
        if config.idle_timeout_s:
            deadlines.append((self._last_audio_at + config.idle_timeout_s, self._idle_ending))
        if config.max_session_s:
            deadlines.append((self._started_at + config.max_session_s, self._duration_ending))
        return min(deadlines, key=itemgetter(0), default=None)

    def _idle_ending(self) -> Ending:
        message = f"no audio input for {self._config.idle_timeout_s:g}s"
        error = server_error(TEXT_ONLY, message, self._connection_id)
        return Ending(WSCloseCode.OK, "idle timeout", error)

    def _duration_ending(self) -> Ending:
        code = proto.CloseCode.SESSION_TIMEOUT
        message = "maximum session duration reached"
        return Ending(code, message, server_error(code, message, self._connection_id))

    async def _on_message(self, data: bytes) -> None:
        envelope = proto.Message()
        try:
            envelope.ParseFromString(data)
        except DecodeError:
            self._queue_error(INVALID_ARGUMENT, "failed to unmarshal message")
            return
        if envelope.type == proto.MessageType.CLIENT_AUDIO_INPUT:
            await self._on_audio(envelope.client_audio_input)
        elif envelope.type == proto.MessageType.CLIENT_INTERRUPT:
            self._sim.stats.interrupts += 1
            await self._drop_request(envelope.client_interrupt.req_id)
        else:
            # Older production servers ignore what they do not know (e.g. pause/resume).
            self._log.debug("message ignored", type=envelope.type)

    async def _on_audio(self, audio_input: Any) -> None:
        self._last_audio_at = self._loop.time()
        self._sim.stats.audio_bytes += len(audio_input.audio)
        req_id: str = audio_input.req_id
        if req_id in self._retired:
            return
        request = self._requests.get(req_id) or self._open_request(req_id)
        if request is None or request.ended:  # ended: its end message is still queued
            return
        request.feed(audio_input.audio, audio_input.end)
        if request.pending > MAX_PENDING_KEYFRAMES:
            self._queue_error(RESOURCE_EXHAUSTED, "audio input too far ahead", req_id)
            await self._drop_request(req_id)

    def _open_request(self, req_id: str) -> RequestBuffer | None:
        if len(self._requests) >= MAX_ACTIVE_REQUESTS:
            self._queue_error(RESOURCE_EXHAUSTED, "too many concurrent requests", req_id)
            self._retire(req_id)
            return None
        request = RequestBuffer(req_id, self.sample_rate, self._loop.time())
        request.emitter = asyncio.create_task(self._emit(request), name=f"sim-emit-{req_id}")
        request.emitter.add_done_callback(self._on_emitter_done)
        self._requests[req_id] = request
        return request

    def _on_emitter_done(self, task: asyncio.Task[None]) -> None:
        # Emitters are cancelled, never awaited for a result, so a crash is surfaced here.
        if not task.cancelled() and task.exception() is not None:
            self._log.error("emitter failed", exc_info=task.exception())
            self._end(Ending(WSCloseCode.INTERNAL_ERROR, "internal error"))

    def _retire(self, req_id: str) -> None:
        self._retired[req_id] = None
        if len(self._retired) > RETIRED_REQUEST_IDS:
            self._retired.popitem(last=False)

    async def _drop_request(self, req_id: str) -> None:
        """Forget a request: nothing more is sent for it, not even end."""
        self._retire(req_id)
        request = self._requests.pop(req_id, None)
        if request is not None and request.emitter is not None:
            await _cancel([request.emitter])

    def _queue_error(self, code: int, message: str, req_id: str = "") -> None:
        item = Outbound(server_error(code, message, self._connection_id, req_id))
        try:
            self._outbound.put_nowait(item)
        except asyncio.QueueFull:
            # The client stopped reading; the reader must not block on it.
            self._end(Ending(WSCloseCode.TRY_AGAIN_LATER, "client not reading"))

    # Emitters.

    async def _emit(self, request: RequestBuffer) -> None:
        batch = self._config.batch_keyframes
        first = True
        while True:
            while not request.ready(batch):
                request.changed.clear()
                await request.changed.wait()
            if first and self._config.first_batch_delay_ms:
                await self._sleep_until(
                    request.started_at + self._config.first_batch_delay_ms / 1000
                )
            first = False
            keyframes, final = request.take(batch)
            if self._config.realtime:
                await self._sleep_until(request.started_at + request.taken / FPS)
            payload = encode_animation(
                self._connection_id, request.req_id, end=final, keyframes=keyframes
            )
            await self._outbound.put(Outbound(payload, request.req_id, len(keyframes), final))
            if final:
                return

    async def _sleep_until(self, when: float) -> None:
        delay = when - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    # Writer.

    async def _write_loop(self) -> None:
        try:
            while True:
                item = await self._outbound.get()
                if item.req_id is None:
                    await self._send(item.payload)
                    continue
                if not self._sendable(item.req_id):
                    continue
                if await self._inject_fault(item.req_id):
                    return
                if not self._sendable(item.req_id):  # the fault stalled or failed it
                    continue
                await self._send(item.payload)
                self._note_first_batch(item.req_id)  # before _count_sent forgets an ended one
                self._count_sent(item)
                if await self._inject_fault(item.req_id):
                    return
        except ConnectionError:
            self._end(CLIENT_GONE)

    def _sendable(self, req_id: str) -> bool:
        # Interrupted and failed requests were removed; their queued messages are dropped.
        return not self._stalled and req_id in self._requests

    def _note_first_batch(self, req_id: str) -> None:
        request = self._requests.get(req_id)
        if request is not None and not request.first_batch_sent:
            request.first_batch_sent = True
            self._sim.first_batch_sent(req_id, self._loop.time() - request.started_at)

    def _count_sent(self, item: Outbound) -> None:
        self._keyframes_sent += item.keyframes
        stats = self._sim.stats
        stats.keyframes_sent += item.keyframes
        if item.end and item.req_id is not None:
            stats.requests_ended += 1
            self._requests.pop(item.req_id, None)
            self._retire(item.req_id)

    async def _inject_fault(self, req_id: str) -> bool:
        """Fire one due runtime fault; True when it ends the connection."""
        rule = self._sim.take_fault(RUNTIME_FAULTS, self._avatar_id, self._keyframes_sent)
        if rule is None:
            return False
        if rule.kind is FaultKind.STALL:
            self._stalled = True
        elif rule.kind is FaultKind.SERVER_ERROR:
            message = rule.message or "driven server request failed"
            code = INTERNAL if rule.code is None else rule.code
            await self._send(server_error(code, message, self._connection_id, req_id))
            await self._drop_request(req_id)
        elif rule.kind is FaultKind.DROP:
            self._end(Ending(abort=True))
            return True
        elif rule.kind is FaultKind.CLOSE:
            code = proto.CloseCode.UPSTREAM_UNAVAILABLE if rule.code is None else rule.code
            self._end(Ending(code, rule.message or "upstream unavailable"))
            return True
        return False
