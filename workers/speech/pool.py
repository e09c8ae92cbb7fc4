"""``SessionPool``: Motion sessions by conversation, capped through ``SessionLeases``, closed when
idle."""

from __future__ import annotations

import asyncio
from contextlib import suppress

import spatius
import structlog
from redis.exceptions import RedisError

from workers.metrics import ProducerMetrics
from workers.speech.endpoints import MotionEndpoints
from workers.speech.leases import FENCE_CLOSE_S, SessionLeases
from workers.speech.periodic import Periodic
from workers.speech.session import (
    REASON_CAPACITY,
    REASON_MOTION_ERROR,
    MotionSession,
    MotionUnavailable,
    describe_error,
)
from workers.speech.tokens import TokenStock

log = structlog.get_logger(__name__)

_MIN_SPARE_IDLE_S = 1.0
# Bounds that keep a producer's stop bounded when Redis does not answer (slots left expire).
_RELEASE_S = 1.0
_CLOSE_ALL_S = 2.0


class SessionPool:
    """Motion sessions by conversation, capped by ``SessionLeases`` and closed when idle.

    :param idle_s: an unused session is closed after this long (the server bills open time).
    :param per_turn: close every session right after its turn instead of keeping it.
    :param open_timeout_s: longest a session may take to fetch its token and shake hands.
    :param tokens: session tokens fetched ahead (``workers.speech.tokens``), or None.
    """

    def __init__(
        self,
        endpoints: MotionEndpoints,
        leases: SessionLeases,
        *,
        idle_s: float,
        per_turn: bool,
        open_timeout_s: float,
        tokens: TokenStock | None = None,
        metrics: ProducerMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._endpoints = endpoints
        self._leases = leases
        self._idle_s = idle_s
        self._per_turn = per_turn
        self._open_timeout_s = open_timeout_s
        self._tokens = tokens
        self._sessions: dict[str, MotionSession] = {}
        self._fenced: set[asyncio.Task[None]] = set()  # closes of fenced sessions in flight
        self._marked: set[str] = set()  # lease ids of the kept sessions marked in Redis
        # Also the cadence at which waiting turns elsewhere get idle sessions closed for them.
        self._reaper = Periodic("motion-session-reaper", max(0.05, min(idle_s / 4, 1.0)), self.reap)

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self) -> None:
        self._reaper.start()

    async def close(self) -> None:
        await self._reaper.close()
        if self._fenced:
            await asyncio.wait(set(self._fenced))
        sessions, self._sessions = list(self._sessions.values()), {}
        if not sessions:
            return
        # Bounded whether Redis answers or not (a producer's stop is): slots left behind expire.
        closing = [asyncio.ensure_future(self._dispose(s)) for s in sessions]
        _, pending = await asyncio.wait(closing, timeout=_CLOSE_ALL_S)
        for task in pending:
            task.cancel()
        await asyncio.wait(closing)
        for task in closing:
            if not task.cancelled() and task.exception() is not None:
                log.warning("motion_session_close_failed", error=repr(task.exception()))

    def idle(self) -> int:
        """Sessions kept and not in use: each can serve its conversation's next turn, or be
        closed to give its slot to another conversation's."""
        return sum(not session.in_use for session in self._sessions.values())

    def keeps(self, conversation_id: str) -> bool:
        """A session is kept for the conversation (its next turn likely reuses it)."""
        existing = self._sessions.get(conversation_id)
        return existing is not None and existing.broken is None and not existing.retire

    def has_session(self, conversation_id: str, avatar_id: str, sample_rate: int) -> bool:
        """The conversation keeps a session its next turn can reuse (no new slot needed)."""
        existing = self._sessions.get(conversation_id)
        return existing is not None and existing.reusable_for(avatar_id, sample_rate)

    def uses_lease(self, lease_id: str) -> bool:
        return any(session.lease_id == lease_id for session in self._sessions.values())

    def reuse(self, conversation_id: str, avatar_id: str, sample_rate: int
              ) -> MotionSession | None:
        """The conversation's kept session when its turn can reuse it, checked out at once;
        None: ``checkout`` it (it opens one, or replaces one that cannot serve). No await: with
        many turns starting together, each await of a checkout that has nothing to wait for is
        one more pass of the producer's busy event loop before the turn's audio reaches the
        Motion Server."""
        existing = self._sessions.get(conversation_id)
        if existing is None or not existing.reusable_for(avatar_id, sample_rate):
            return None
        existing.touch()  # not idle any more: the reaper must leave it to this turn
        return existing

    async def checkout(
        self, conversation_id: str, avatar_id: str, sample_rate: int, *,
        lease_id: str | None = None,
    ) -> MotionSession:
        """The conversation's session, opened if needed; MotionUnavailable when none can be had.

        ``lease_id`` is a slot the caller reserved beforehand (``SessionLeases.acquire``); it is
        used for a new session, or released when the kept one is reused. Callers serialize turns
        per conversation, so one conversation never checks out twice.
        """
        reused = self.reuse(conversation_id, avatar_id, sample_rate)
        if reused is not None:
            if lease_id is not None:
                await self._leases.release(lease_id)
            return reused
        existing = self._sessions.pop(conversation_id, None)
        if existing is not None:
            await self._dispose(existing)
        if lease_id is not None and not self._leases.holds(lease_id):
            lease_id = None  # the reservation was fenced while it waited: take a fresh slot
        if lease_id is None:
            lease_id = await self._leases.acquire()
        if lease_id is None:
            raise MotionUnavailable(REASON_CAPACITY, "no Motion Server session slot free")
        session = MotionSession(self._endpoints, conversation_id=conversation_id,
                                avatar_id=avatar_id, sample_rate=sample_rate, lease_id=lease_id,
                                metrics=self._metrics)
        await self._open(session)
        self._sessions[conversation_id] = session
        log.info("motion_session_opened", conversation_id=conversation_id, open=len(self))
        return session

    async def _mark(self, session: MotionSession) -> None:
        """Mark the session kept for its conversation, once (``SessionLeases.mark_kept``); best
        effort: without the mark a submit at the cap only leaves the next turn to a worker."""
        if session.lease_id in self._marked:
            return
        try:
            await asyncio.wait_for(self._leases.mark_kept(session.conversation_id,
                                                          session.lease_id), _RELEASE_S)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("sdk_kept_mark_failed", error=str(exc) or type(exc).__name__)
        else:
            self._marked.add(session.lease_id)

    async def _open(self, session: MotionSession) -> None:
        try:
            await asyncio.wait_for(session.start(self._tokens), self._open_timeout_s)
        except (spatius.AvatarSDKError, ValueError, OSError, TimeoutError) as exc:
            await self._dispose(session)
            log.warning("motion_session_open_failed", error=describe_error(exc))
            if self._metrics is not None:
                self._metrics.motion_error("open_failed")
            raise MotionUnavailable(REASON_MOTION_ERROR, describe_error(exc)) from exc
        except BaseException:
            await self._dispose(session)  # cancelled while opening: free the slot at once
            raise

    async def checkin(self, session: MotionSession) -> None:
        """After a turn: keep the session for the next one unless it must go. A kept one is
        marked then, off its turn's way to the client's first audio and frames."""
        if self._per_turn or session.broken is not None or session.retire:
            if self._sessions.get(session.conversation_id) is session:
                del self._sessions[session.conversation_id]
            await self._dispose(session)
        elif self._sessions.get(session.conversation_id) is session:
            await self._mark(session)

    async def reap(self) -> None:
        """Close sessions idle for ``idle_s``, idle ones that broke or lost their lease, and, while
        turns anywhere wait for a slot, as many idle sessions as they need (longest idle first):
        a kept session only saves a handshake, a waiting turn would otherwise go audio-only."""
        wanted = await self._leases.demand() if self._sessions else 0
        # From here to the deletions nothing awaits, so no turn can check a doomed session out.
        idle = sorted((s for s in self._sessions.values() if not s.in_use),
                      key=lambda s: s.idle_for(), reverse=True)
        doomed = [s for s in idle if s.idle_for() >= self._idle_s or s.broken or s.retire]
        # A session checked out moments ago is idle until its turn attaches; spare it.
        spare = [s for s in idle if s not in doomed and s.idle_for() >= _MIN_SPARE_IDLE_S]
        doomed += spare[:wanted]
        for session in doomed:
            del self._sessions[session.conversation_id]
        if doomed:
            log.info("motion_sessions_reaped", closed=len(doomed), open=len(self))
            await asyncio.gather(*(self._dispose(s) for s in doomed))

    def lease_lost(self, lease_id: str) -> None:
        """This process may no longer use the slot (not renewed in time, or taken meanwhile):
        the session it covered closes now, even mid-turn (the turn goes on audio-only), so the
        cap holds at the Motion Server before anyone else can be given the slot."""
        for conversation_id, session in list(self._sessions.items()):
            if session.lease_id == lease_id:
                del self._sessions[conversation_id]
                session.fence()
                task = asyncio.create_task(self._dispose(session, FENCE_CLOSE_S),
                                           name="motion-session-fenced")
                self._fenced.add(task)
                task.add_done_callback(self._fenced.discard)

    async def _dispose(self, session: MotionSession, timeout_s: float | None = None) -> None:
        if session.closed:
            return  # fenced and closed already; its turn checks it in afterwards
        try:
            await session.close(timeout_s)
        finally:
            try:
                await asyncio.wait_for(self._leases.release(session.lease_id), _RELEASE_S)
            except (RedisError, OSError, TimeoutError) as exc:
                # Harmless beyond a delay: the slot expires after lease_s without renewals.
                log.warning("sdk_lease_release_failed", error=str(exc))
            # Left behind, the mark is harmless: its lease is gone from the session set (lease
            # ids are never reused), which is what a submit checks it against.
            if session.lease_id in self._marked:
                self._marked.discard(session.lease_id)
                with suppress(RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(self._leases.unmark_kept(
                        session.conversation_id, session.lease_id), _RELEASE_S)
