"""One connected client: where delivery starts, its bounded send queue, its writer and reader."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import structlog
from aiohttp import WSMsgType, web

from relay import streams, wire
from relay.edge.admission import FRAME_ERRORS
from relay.edge.framing import FrameWriter, SlowClient, delivery_frame, frame_payload
from relay.edge.metrics import DeliveryTally, EdgeMetrics
from relay.errors import WireError
from relay.keys import Keys
from relay.redis_conn import RedisClient
from relay.settings import Settings

log = structlog.get_logger(__name__)

_CATCH_UP_PAGE = 256
# One write carries at most this much; the rest waits for the next turn of the loop.
_BATCH_FRAMES = 512
_BATCH_BYTES = 512 * 1024


@dataclass(frozen=True)
class StartPoint:
    """Where a client's delivery begins. ``position`` is exclusive unless ``inclusive``."""

    position: str
    inclusive: bool
    mode: str  # "resume" | "turn" | "next_turn" | "live"
    recovered: bool | None


# A client that joins while a turn plays starts at that turn's turn_start ("turn"): the SDK needs
# a turn's first audio before its frames. When that start is no longer retained (a turn longer
# than the history), delivery starts at the next turn_start instead ("next_turn"): nothing of the
# current turn is sent, so the client never gets frames before audio nor a turn without a start.
NEXT_TURN = "next_turn"


async def choose_start(
    client: RedisClient, keys: Keys, conversation_id: str, last_id: str | None
) -> tuple[StartPoint, str]:
    """Return the start point and the stream's current tip.

    A resume position still inside retention continues right after it. Without one (or when it
    cannot be honoured) a client joins at the first entry of the active turn, because the client
    SDK needs a turn's first audio before its frames; with no active turn it starts live. A
    client whose position is at or past that turn's start already had its start (Redis lost
    entries after its position: a restart from a file missing the last writes, a failover):
    sending the turn again would hand it messages it has, so it starts at the next turn.
    """
    info = await streams.stream_info(client, keys, conversation_id)
    if last_id is not None and info.can_resume_after(last_id):
        return StartPoint(last_id, False, "resume", True), info.last_id
    recovered = None if last_id is None else False
    turn = await streams.read_turn(client, keys, conversation_id)
    if turn is not None and turn.status == streams.ACTIVE and info.exists:
        start = streams.parse_id(turn.start_id)
        if info.first_id is not None and start < streams.parse_id(info.first_id):
            return StartPoint(info.last_id, False, NEXT_TURN, recovered), info.last_id
        if last_id is not None and start <= streams.parse_id(last_id):
            return StartPoint(info.last_id, False, NEXT_TURN, recovered), info.last_id
        return StartPoint(turn.start_id, True, "turn", recovered), info.last_id
    return StartPoint(info.last_id, False, "live", recovered), info.last_id


class ClientSession:
    """Delivers one conversation to one WebSocket, in stream order, exactly once."""

    def __init__(self, ws: web.WebSocketResponse, conversation_id: str, settings: Settings,
                 metrics: EdgeMetrics | None = None) -> None:
        self.ws = ws
        self._metrics = metrics
        self.conversation_id = conversation_id
        self._settings = settings
        self._queue: deque[tuple[tuple[int, int], bytes]] = deque()
        self._writer: FrameWriter | None = None
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing = asyncio.Event()  # set with the close code: a blocked write gives up
        self._loop = asyncio.get_running_loop()
        self._close_code: int | None = None
        self._close_reason = ""
        self._close_error: bytes | None = None
        self._sent = (0, -1)  # id of the last frame written to the socket
        self._awaiting_turn_start = False  # "next_turn": entries before a turn_start are skipped
        self._direct = False  # live and caught up: offers may write straight to the socket
        self.sent_count = 0
        self.peak_queued_bytes = 0

    # --- called by the hub, never awaits -------------------------------------------------------

    def offer_many(self, batch: list[tuple[tuple[int, int], bytes]]) -> None:
        """Take complete WebSocket frames of stream entries (parsed id, frame), in stream order:
        one call per live push or history page, however many entries it carries.

        Once the session is live and nothing is queued, the frames are written to the socket
        right here (one write, no task switch); otherwise, or when the socket is not taking
        more, they wait in the bounded queue for ``pump``.
        """
        if self._close_code is not None:
            return
        writer = self._writer
        if self._direct and not self._queue and writer is not None and writer.writable():
            if self._awaiting_turn_start:
                frames = [frame for entry_id, frame in batch if self._admit(entry_id, frame)]
            else:
                frames = [frame for entry_id, frame in batch if self._fresh(entry_id)]
            if frames:
                writer.write_now(frames)
                self.sent_count += len(frames)
            return
        size = sum(len(frame) for _, frame in batch)
        limits = self._settings
        if (len(self._queue) + len(batch) > limits.client_queue_messages
                or self._queued_bytes + size > limits.client_queue_bytes):
            # Overflow policy: disconnect, never drop. The client resumes from its last position
            # and gets everything still retained, so a slow client costs itself, not the edge.
            self.request_close(wire.CloseCode.SLOW_CONSUMER, "slow_consumer")
            return
        self._queue.extend(batch)
        self._queued_bytes += size
        self.peak_queued_bytes = max(self.peak_queued_bytes, self._queued_bytes)
        self._wakeup.set()

    @property
    def close_code(self) -> int | None:
        """The code this edge closed with, else the one the client sent (None: no close)."""
        return self._close_code if self._close_code is not None else self.ws.close_code

    @property
    def close_reason(self) -> str:
        return self._close_reason

    def on_history_lost(self) -> None:
        """Redis lost entries of this stream after what the client got: it reconnects with its
        last_id and is told ``recovered: false`` (docs/protocol.md), as any resume from a lost
        position is; nothing more of this connection could be trusted to be whole."""
        self.request_close(wire.CloseCode.EDGE_RESTARTING, "history_lost")

    def on_unavailable(self) -> None:
        self.request_close(wire.CloseCode.UNAVAILABLE, "redis_unavailable")

    def on_behind(self) -> None:
        """The edge fell too far behind this conversation's live push to fill the gap itself:
        the client resumes (here or elsewhere) from its own position, through history."""
        self.request_close(wire.CloseCode.SLOW_CONSUMER, "edge_behind")

    def request_close(self, code: int, reason: str, error_message: str | None = None) -> None:
        """Close after the current write; with ``error_message``, send error{reason} first."""
        if self._close_code is None:
            self._close_code, self._close_reason = code, reason
            if error_message is not None:
                self._close_error = wire.error(reason, error_message)
            self._wakeup.set()
            self._closing.set()

    # --- delivery ----------------------------------------------------------------------------

    def _frame_writer(self) -> FrameWriter:
        if self._writer is None:
            self._writer = FrameWriter(self.ws, self._settings.send_timeout_s,
                                       buffer_bytes=self._settings.client_send_buffer_bytes)
        return self._writer

    async def _write(self, frames: list[bytes]) -> None:
        """Write frames; a client that reads none of them within the send timeout is closed
        with 4429 (the session stops writing; ``pump`` sends the close)."""
        try:
            await self._frame_writer().write(frames, self._closing)
        except SlowClient:
            self.request_close(wire.CloseCode.SLOW_CONSUMER, "slow_consumer")
        self.sent_count += len(frames)

    def _fresh(self, entry_id: tuple[int, int]) -> bool:
        """True once per id, in increasing order: the seam between history and live delivery
        may offer an entry twice, and it must go out once."""
        if entry_id <= self._sent:
            return False
        self._sent = entry_id
        return True

    async def catch_up(
        self, client: RedisClient, keys: Keys, start: StartPoint, until: str,
        limiter: asyncio.Semaphore,
    ) -> None:
        """Send stored entries from the start point up to ``until`` (inclusive), page by page.

        ``limiter`` bounds concurrent history reads across the edge; it is held for each read,
        never while sending, so a slow client cannot starve the others' joins.
        """
        if start.mode == NEXT_TURN:
            self._awaiting_turn_start = True  # the live queue is filtered (_write_batch)
        stop = streams.parse_id(until)
        if not start.inclusive and streams.parse_id(start.position) >= stop:
            return  # nothing was appended between choosing the start and attaching
        # A "live" or "next_turn" start is the tip read before attaching; entries appended since
        # (a turn_start among them) were already delivered to the subscription, so they are read
        # here: without this a client joining as a turn opens would get it without its start.
        position, inclusive = start.position, start.inclusive
        while True:
            reader = streams.read_from if inclusive else streams.read_after
            async with limiter:
                rows = await reader(client, keys, self.conversation_id, position,
                                    count=_CATCH_UP_PAGE)
            frames, done = [], len(rows) < _CATCH_UP_PAGE
            tally = DeliveryTally()
            if start.mode == "turn" and position == start.position and (
                    not rows or rows[0][0] != start.position):
                self._awaiting_turn_start = True  # the turn's start was trimmed meanwhile
            for entry_id, stored in rows:
                parsed = streams.parse_id(entry_id)
                if parsed > stop:
                    done = True
                    break
                if self._awaiting_turn_start and not self._starts_turn(stored):
                    self._fresh(parsed)  # skipped for good: never sent later either
                    continue
                if self._fresh(parsed):
                    frames.append(delivery_frame(entry_id.encode(), stored))
                    tally.add(stored, 1, len(frames[-1]))
            if frames:
                await self._write(frames)
                if self._metrics is not None:
                    self._metrics.delivered_history(tally)
            if done or self._close_code is not None:
                return
            position, inclusive = rows[-1][0], False

    async def pump(self) -> None:
        """Drain the live queue, a batch per write, until the session is asked to close. While
        the queue is empty, offers write directly (see ``offer_many``)."""
        self._frame_writer()
        while True:
            self._direct = False
            while self._queue and self._close_code is None:
                await self._write_batch()
            if self._close_code is not None:
                await self._close()
                return
            self._wakeup.clear()
            self._direct = True
            await self._wakeup.wait()

    async def _close(self) -> None:
        """Send the close frame behind what is already written (never waiting for a slow client
        to drain it first: the buffers are bounded, so it reads its way there), wait a bounded
        time for the client's answer, and make sure a client that stopped reading does not
        keep the connection: it is dropped one heartbeat interval later (as the heartbeat would
        drop a client that answers no ping)."""
        assert self._close_code is not None
        try:
            async with asyncio.timeout(self._settings.send_timeout_s):
                if self._close_error is not None:
                    await self.ws.send_bytes(self._close_error)
                await self.ws.close(code=self._close_code,
                                    message=self._close_reason.encode(), drain=False)
        except (ConnectionError, TimeoutError):
            pass  # the client left first, or never answered the close
        writer = self._writer
        if writer is not None and writer.unsent_bytes:
            self._loop.call_later(self._settings.heartbeat_s, writer.abort)

    def _starts_turn(self, stored: bytes) -> bool:
        """True for a turn_start entry (a delivery frame's payload works too), and from then on
        nothing is skipped. Decodes the entry: only clients awaiting a turn_start get here."""
        if wire.stored_kind(stored)[0] != wire.TURN_START:
            return False
        self._awaiting_turn_start = False
        return True

    def _admit(self, entry_id: tuple[int, int], frame: bytes) -> bool:
        """``_fresh``, and for a "next_turn" client nothing before the next turn_start (an entry
        skipped counts as sent: it never goes out later)."""
        if self._awaiting_turn_start and not self._starts_turn(frame_payload(frame)):
            self._fresh(entry_id)
            return False
        return self._fresh(entry_id)

    async def _write_batch(self) -> None:
        # Only as much as the transport may hold: a backlog stays in the queue, where its
        # bounds count it, instead of in buffers the edge cannot see into.
        room = self._settings.client_send_buffer_bytes - self._frame_writer().unsent_bytes
        limit = max(1, min(_BATCH_BYTES, room))
        frames: list[bytes] = []
        size = 0
        while self._queue and len(frames) < _BATCH_FRAMES and size < limit:
            entry_id, frame = self._queue.popleft()
            self._queued_bytes -= len(frame)
            if self._admit(entry_id, frame):
                frames.append(frame)
                size += len(frame)
        if frames:
            await self._write(frames)

    async def read_client(self) -> None:
        """Answer pings; refuse anything else with an error message and a close."""
        limit = self._settings.client_message_max_bytes
        async for msg in self.ws:
            if msg.type == WSMsgType.ERROR:
                # aiohttp failed the connection itself: a frame error or the transport's size cap
                # (error and close already sent, see EdgeWebSocket), or a lost connection.
                # The error's code, not ws.close_code: that becomes the client's reply, or 1006.
                code = getattr(msg.data, "code", None)
                frame_error = FRAME_ERRORS.get(code) if isinstance(code, int) else None
                if code is not None and frame_error is not None:
                    log.info("client_message_refused", error_code=frame_error[0],
                             close_code=code)
                    self.request_close(code, frame_error[0])
                return
            if msg.type != WSMsgType.BINARY:
                await self._refuse(wire.CloseCode.BAD_REQUEST, "bad_message",
                                   "only binary msgpack messages are accepted")
                return
            if len(msg.data) > limit:
                await self._refuse(wire.CloseCode.TOO_BIG, "message_too_big",
                                   f"client messages are limited to {limit} bytes")
                return
            try:
                decoded = wire.decode_client(msg.data, max_bytes=limit)
            except WireError as exc:
                await self._refuse(wire.CloseCode.BAD_REQUEST, "bad_message", str(exc))
                return
            if decoded.kind == wire.PING:
                try:
                    await self.ws.send_bytes(wire.pong(decoded.fields.get("nonce")))
                except ConnectionError:
                    return

    async def _refuse(self, code: int, error_code: str, message: str) -> None:
        log.info("client_message_refused", error_code=error_code, detail=message)
        self.request_close(code, error_code, message)

