"""Leases in Redis that bound what producers do at once, across every producer process.

* ``SessionLeases`` caps the Motion Server sessions open at once (the Spatius plan's concurrency
  limit). One sorted set holds a member per open session with its expiry time as the score. A
  producer that cannot renew a lease within 2/3 of ``lease_s`` closes its session (the fence);
  a crashed producer's slots come back once the fence and a close would be over; a producer
  that may only be paused keeps its slots counted until the Motion Server has dropped its
  sessions (see ``EXPIRE_LEASES``).
* ``ConversationLeases`` lets one producer at a time run a conversation's turns, so the turns of a
  conversation never interleave. The stream itself is protected by the fenced writes of
  ``relay.streams``; this lease only keeps honest producers from superseding each other's turns.

Each class renews what it holds from one owned background task (``Periodic``). All times that
decide expiry come from the Redis server clock (``TIME`` inside the scripts), so producers with
skewed clocks still agree.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any

import structlog
from redis.exceptions import RedisError

from relay.errors import RelayError
from relay.keys import Keys
from relay.lua import NOW_MS, TAKE_LOCK, register
from relay.redis_conn import RedisClient
from relay.streams import Lock
from workers.speech.periodic import Periodic

log = structlog.get_logger(__name__)

# Polling for a slot backs off from the first to the last delay; a local release wakes waiters
# at once, so the cap only delays waiters on other processes.
_FIRST_POLL_S = 0.05
_MAX_POLL_S = 1.0
_GIVE_BACK_S = 1.0  # a cancelled slot take waits this long to give back what it took


# Lua: expire_leases(set, now, p) frees the slots nobody can still be using, and only those.
# ``p`` = {lease_ms, hold_ms, early_ms, alive_head, alive_tail, liveness_known}. A member's score
# is its last renewal + lease_ms. Its producer's liveness is whether that process is still
# subscribed to its own alive channel (``Keys.producer_alive``): a crashed process's connections,
# and so its subscription and its Motion Server sessions, close with it. So:
# * owner not subscribed, unrenewed for early_ms: freed. A live producer never goes that long
#   without renewing: it fences (closes) a session whose lease it could not renew for 2/3 of
#   lease_ms (``SessionLeases.check_fences``), and early_ms leaves the close time on top;
# * owner still subscribed (or liveness unknown: a cluster, where subscriptions are per node):
#   it may be paused (SIGSTOP, a frozen VM) with its sessions open on the Motion Server and no
#   way to close them, so the slot stays counted until hold_ms after the lease expired (the
#   Motion Server's own dead-peer bound, RELAY_SDK_PAUSED_HOLD_S).
EXPIRE_LEASES = """
local function expire_leases(set, now, p)
  local lease_ms, hold_ms, early_ms = tonumber(p[1]), tonumber(p[2]), tonumber(p[3])
  local stale = redis.call('ZRANGEBYSCORE', set, '-inf', now + lease_ms - early_ms, 'WITHSCORES')
  for i = 1, #stale, 2 do
    local member, score = stale[i], tonumber(stale[i + 1])
    local alive = 1
    if p[6] == '1' then
      local owner = string.match(member, '^(.*):[^:]*$') or member
      alive = redis.call('PUBSUB', 'NUMSUB', p[4] .. owner .. p[5])[2]
    end
    if alive == 0 or now > score + hold_ms then redis.call('ZREM', set, member) end
  end
  local keep = (lease_ms + hold_ms) * 2
  if redis.call('PTTL', set) < keep then redis.call('PEXPIRE', set, keep) end
end
"""

# KEYS: lease set, waiter set. ARGV: cap, member, waiter_ttl_ms, then the six expiry parameters.
# Returns 1 when admitted, 0 when full; a refused caller is recorded as a waiter until
# waiter_ttl_ms passes. Run twice: the member already holds its slot, so the second run renews it
# and answers 1 (a slot is per member, never taken twice).
_ACQUIRE = NOW_MS + EXPIRE_LEASES + """
local p = {ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]}
expire_leases(KEYS[1], now, p)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) == false
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 2)
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
return 1
"""

# KEYS: lease set, waiter set. ARGV: cap, member, waiter_ttl_ms, then the six expiry parameters.
# Free slots now, taking none; when there are none the caller is recorded as a waiter, so idle
# sessions anywhere yield to it. Run twice: the same answer; the waiter mark is refreshed, not
# added twice.
_ROOM = NOW_MS + EXPIRE_LEASES + """
expire_leases(KEYS[1], now, {ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]})
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
if free > 0 then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return free
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 2)
return 0
"""

# KEYS: waiter set. Returns how many turns are waiting for a slot right now. Run twice: a read.
_DEMAND = NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: lease set. Slots counted now (held, or held for a producer that may be paused); read-only.
_USED = """
return redis.call('ZCARD', KEYS[1])
"""

# A waiter polls at least every _MAX_POLL_S; its mark outlives a few polls, no more.
_WAITER_TTL_MS = int(_MAX_POLL_S * 3000)

# KEYS: lease set. ARGV: cap, the six expiry parameters, members... Extends live members;
# re-admits members that were freed while there is room. Returns the members that are lost.
# Run twice: extends the same members again.
_RENEW = NOW_MS + EXPIRE_LEASES + """
expire_leases(KEYS[1], now, {ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]})
local lost = {}
for i = 8, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) ~= false
     or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# The published cap outlives this many renewal rounds of its producer without a new one.
_CAP_PUBLISHED_RENEWALS = 9

# KEYS: kept hash. ARGV: conversation, lease id, ttl_ms. Marks the conversation's kept session.
# Run twice: the same mark, the expiry set again.
_MARK_KEPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('PEXPIRE', KEYS[1], ARGV[3])
"""
# KEYS: kept hash. ARGV: conversation, lease id. Forgets the conversation's kept session only if
# it is still this one (another producer may keep a newer one for it). Run twice: nothing left to
# forget, nothing changes.
_UNMARK_KEPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""
# The marks outlive the last session marked anywhere by this long; a mark left by a producer that
# crashed is harmless meanwhile (its lease is gone from the session set).
_KEPT_TTL_MS = 24 * 3600 * 1000

# A fenced session's close is given this long (its lease's early expiry leaves this much).
FENCE_CLOSE_S = 2.0

# KEYS: lock. ARGV: owner token, lease_ms. 1 when the caller still owns it and it was extended.
# Run twice: extends it again.
_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock. ARGV: owner token, lease_ms, previous owner. Takes the lock when it is free or held
# by the previous owner (a producer whose turn attempt was fenced by a takeover). 1 when taken.
# Run twice: the second run finds the caller's own token and answers 1 again.
_TAKE_LOCK = TAKE_LOCK + """
return take_lock(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) and 1 or 0
"""

# KEYS: lock. ARGV: owner token. Deletes the lock only when the caller owns it.
# Run twice: the second run finds it gone (or someone else's) and does nothing.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ConversationBusy(RelayError):
    """Another producer kept the conversation for longer than the caller was willing to wait."""


class _Wakeup:
    """Lets local waiters retry at once when this process frees something."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


# Releasing what a closing producer still holds gets this long in all: the leases expire anyway,
# and a producer's stop is bounded whether Redis answers or not.
_CLOSE_RELEASE_S = 1.0


async def _release_all(releases: list[Coroutine[Any, Any, None]]) -> None:
    if not releases:
        return
    tasks = [asyncio.ensure_future(release) for release in releases]
    done, pending = await asyncio.wait(tasks, timeout=_CLOSE_RELEASE_S)
    for task in pending:
        task.cancel()
    for task in done:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.info("lease_release_at_close_failed", error=repr(error))
    if pending:
        await asyncio.wait(pending)


async def _wait_a_little(event: asyncio.Event, delay_s: float) -> None:
    with suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), delay_s)


class SessionLeases:
    """Global cap on concurrent Motion Server sessions: acquire, renew, fence and release slots.

    :param cap: most sessions open at once across all producers sharing ``keys``.
    :param lease_s: how long a slot outlives its holder's last renewal.
    :param wait_s: longest ``acquire`` waits for a free slot before giving up.
    :param hold_s: how long past its expiry the slot of a producer that may be paused (still
        subscribed to its alive channel) stays counted: the Motion Server's dead-peer bound.
    :param liveness_known: the alive channel's subscriptions are visible to the lease scripts
        (a single server; not a cluster, where they are per node): crashed producers' slots
        come back early. Without it every expired slot is held ``hold_s`` more.
    :param on_lost: called with a lease id this process may no longer use (it could not be
        renewed in time, or was taken while unrenewed): the session it covered must close now.
    """

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        *,
        cap: int,
        lease_s: float,
        wait_s: float,
        owner: str,
        hold_s: float = 0.0,
        liveness_known: bool = True,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        if cap <= 0 or lease_s <= 0 or wait_s < 0 or hold_s < 0:
            raise ValueError("cap and lease_s must be positive, wait_s and hold_s not negative")
        self._client = client
        self._key = keys.sdk_sessions()
        self._waiters_key = keys.sdk_waiters()
        self._cap_key = keys.sdk_session_cap()
        self._kept_key = keys.sdk_kept()
        self._cap = cap
        self._lease_s = lease_s
        self._lease_ms = int(lease_s * 1000)
        self._wait_s = wait_s
        self._owner = owner
        self._on_lost = on_lost
        # The fence: a lease not renewed for this long is given up here, its session closed, so
        # it is closed before its slot can be freed for a crashed owner (early_ms) or expire.
        self._fence_s = lease_s * 2 / 3  # two renewals missed
        early_ms = min(self._lease_ms, int((self._fence_s + FENCE_CLOSE_S) * 1000))
        head, _, tail = keys.producer_alive("\0").partition("\0")
        self._expiry: list[str | int] = [self._lease_ms, int(hold_s * 1000), early_ms, head, tail,
                                          "1" if liveness_known else "0"]
        self._held: dict[str, float] = {}  # lease id -> when its last renewal was sent (loop time)
        self._wakeup = _Wakeup()
        self._acquire = register(client, _ACQUIRE)
        self._renew = register(client, _RENEW)
        self._demand = register(client, _DEMAND)
        self._used = register(client, _USED)
        self._room = register(client, _ROOM)
        self._mark_kept = register(client, _MARK_KEPT)
        self._unmark_kept = register(client, _UNMARK_KEPT)
        self._renewer = Periodic("sdk-lease-renewer", lease_s / 3, self.renew)
        # Apart from the renewer: a renewal stuck on a Redis that does not answer must not hold
        # the fence up.
        self._fencer = Periodic("sdk-lease-fence", min(1.0, lease_s / 6), self._fence_round)

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def holds(self, lease_id: str) -> bool:
        """The lease is this process's and still inside its fence."""
        renewed = self._held.get(lease_id)
        return renewed is not None and self._loop_time() - renewed < self._fence_s

    def start(self) -> None:
        self._renewer.start()
        self._fencer.start()

    async def close(self) -> None:
        """Stop renewing and release every slot this process still holds."""
        await self._renewer.close()
        await self._fencer.close()
        await _release_all([self.release(lease_id) for lease_id in list(self._held)])

    async def acquire(self, wait_s: float | None = None) -> str | None:
        """A new lease id, or None when no slot freed up within ``wait_s`` (default: the
        configured wait)."""
        lease_id = f"{self._owner}:{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._wait_s if wait_s is None else wait_s)
        delay = _FIRST_POLL_S
        while True:
            woken = self._wakeup.current()
            if await self._try(lease_id):
                return lease_id
            remaining = deadline - loop.time()
            if remaining <= 0:
                if wait_s is None:
                    log.info("sdk_capacity_exhausted", cap=self._cap, waited_s=self._wait_s)
                return None
            await _wait_a_little(woken, min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL_S)

    async def _try(self, lease_id: str) -> bool:
        sent = self._loop_time()
        # Its own task: a cancelled caller must still learn whether the script took the slot
        # (it may have run, sent before the cancellation came; a batching client sends a command
        # on the loop's next turn).
        attempt = asyncio.ensure_future(self._acquire(
            keys=[self._key, self._waiters_key],
            args=[self._cap, lease_id, _WAITER_TTL_MS, *self._expiry]))
        try:
            admitted = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            await self._give_back_if_taken(attempt, lease_id)
            raise
        if int(admitted) == 1:
            self._held[lease_id] = sent
            return True
        return False

    async def _give_back_if_taken(self, attempt: asyncio.Future[Any], lease_id: str) -> None:
        """After a cancelled take: a slot the script took all the same is released before the
        cancellation goes on (within _GIVE_BACK_S; past that, or on a Redis error, it is left to
        expire after lease_s, since nobody renews it)."""
        try:
            async with asyncio.timeout(_GIVE_BACK_S):
                if int(await asyncio.shield(attempt)) == 1:
                    await self.release(lease_id)
        except (RedisError, OSError, TimeoutError):
            log.warning("sdk_slot_left_to_expire", lease_id=lease_id)

    async def room(self) -> int:
        """Slots free right now across all producers (none is taken). At 0 this producer counts
        as waiting, so idle kept sessions close for it: a worker asks before it takes new work."""
        free = await self._room(keys=[self._key, self._waiters_key],
                                args=[self._cap, f"{self._owner}:gate", _WAITER_TTL_MS,
                                      *self._expiry])
        return max(0, int(free))

    async def demand(self) -> int:
        """Turns on any producer waiting for a slot now; holders close idle sessions for them."""
        return int(await self._demand(keys=[self._waiters_key]))

    async def used(self) -> int:
        """Slots counted across all producers now (for the metrics)."""
        return int(await self._used(keys=[self._key]))

    async def release(self, lease_id: str) -> None:
        self._held.pop(lease_id, None)
        await self._client.zrem(self._key, lease_id)
        self._wakeup.fire()

    async def publish_cap(self) -> None:
        """Say what the cap is (``Keys.sdk_session_cap``) for submits that check it without
        being configured with it; it expires when no producer has said so for
        ``_CAP_PUBLISHED_RENEWALS`` renewal periods. Producers that disagree (a rolling change of
        the setting) overwrite each other; the acquire script keeps using each one's own."""
        ttl_ms = max(1, int(self._lease_ms / 3 * _CAP_PUBLISHED_RENEWALS))
        await self._client.set(self._cap_key, self._cap, px=ttl_ms)

    async def mark_kept(self, conversation_id: str, lease_id: str) -> None:
        """Say that the session under ``lease_id`` serves ``conversation_id`` (``Keys.sdk_kept``):
        a submit that finds the cap reached may still open that conversation's turn at once."""
        await self._mark_kept(keys=[self._kept_key], args=[conversation_id, lease_id, _KEPT_TTL_MS])

    async def unmark_kept(self, conversation_id: str, lease_id: str) -> None:
        await self._unmark_kept(keys=[self._kept_key], args=[conversation_id, lease_id])

    async def renew(self) -> None:
        """Extend every held slot still inside its fence and give up the ones lost meanwhile;
        then publish the cap again (after: that write must never hold up a renewal)."""
        self.check_fences()
        if self._held:
            await self._renew_held()
        await self.publish_cap()

    async def _renew_held(self) -> None:
        held = sorted(self._held)
        sent = self._loop_time()
        lost = await self._renew(keys=[self._key], args=[self._cap, *self._expiry, *held])
        gone = {raw.decode() if isinstance(raw, bytes) else str(raw) for raw in lost or []}
        for lease_id in held:
            if lease_id not in self._held:
                continue  # released (or fenced) while the renewal was in flight
            if lease_id in gone:
                self._give_up(lease_id, "sdk_lease_lost")
            else:
                self._held[lease_id] = sent
        self.check_fences()  # a renewal that took too long renews nothing in time

    def check_fences(self) -> None:
        """Give up every lease not renewed within the fence (Redis unreachable, this process
        paused, a renewal stuck): its session must close before the slot can go to anyone."""
        now = self._loop_time()
        for lease_id, renewed in list(self._held.items()):
            if now - renewed >= self._fence_s:
                self._give_up(lease_id, "sdk_lease_fenced", unrenewed_s=round(now - renewed, 2))

    async def _fence_round(self) -> None:
        self.check_fences()

    def _give_up(self, lease_id: str, event: str, **details: object) -> None:
        self._held.pop(lease_id, None)
        log.warning(event, lease_id=lease_id, **details)
        if self._on_lost is not None:
            self._on_lost(lease_id)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()


class ConversationLeases:
    """Per-conversation mutual exclusion between producers: SET NX PX with an owner token.

    :param owner: unique per ``ConversationLeases`` instance; it is the lock's value, so only the
        holder can extend or delete it.
    :param lease_s: how long the lock outlives its holder's last renewal.
    """

    def __init__(self, client: RedisClient, keys: Keys, *, owner: str, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self._client = client
        self._keys = keys
        self._owner = owner
        self._lease_ms = int(lease_s * 1000)
        self._held: set[str] = set()
        self._wakeup = _Wakeup()
        self._renew_script = register(client, _RENEW_LOCK)
        self._release_script = register(client, _RELEASE_LOCK)
        self._take_script = register(client, _TAKE_LOCK)
        self._renewer = Periodic("conversation-lease-renewer", lease_s / 3, self.renew)

    @property
    def owner(self) -> str:
        return self._owner

    def start(self) -> None:
        self._renewer.start()

    async def close(self) -> None:
        await self._renewer.close()
        await _release_all([self.release(c) for c in list(self._held)])

    async def acquire(self, conversation_id: str, *, wait_s: float, take_from: str = "") -> None:
        """Take the conversation, waiting up to ``wait_s``; raise ConversationBusy after that.

        ``take_from`` names a producer whose lock may be taken at once: the previous owner of a
        turn whose attempt a takeover already fenced (it can write nothing more).
        """
        key = self._keys.conversation_lock(conversation_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        delay = _FIRST_POLL_S
        while True:
            woken = self._wakeup.current()
            if await self._take(key, take_from):
                self._held.add(conversation_id)
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConversationBusy(
                    f"conversation {conversation_id} is busy with another producer's turn"
                )
            await _wait_a_little(woken, min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL_S)

    def lock_for(self, conversation_id: str, take_from: str = "") -> Lock:
        """The conversation's lock as a turn's opening takes it in its own atomic step
        (``ConversationLog.open_turn``); call ``opened_with`` once that opening succeeded."""
        return Lock(self._keys.conversation_lock(conversation_id), self._owner, self._lease_ms,
                    take_from)

    def opened_with(self, conversation_id: str) -> None:
        """A turn's opening took the lock (``lock_for``): renew and release it from now on."""
        self._held.add(conversation_id)

    async def _take(self, key: str, take_from: str) -> bool:
        if not take_from:
            return bool(await self._client.set(key, self._owner, nx=True, px=self._lease_ms))
        args: list[str | int] = [self._owner, self._lease_ms, take_from]
        return bool(int(await self._take_script(keys=[key], args=args)))

    async def release(self, conversation_id: str) -> None:
        self._held.discard(conversation_id)
        key = self._keys.conversation_lock(conversation_id)
        await self._release_script(keys=[key], args=[self._owner])
        self._wakeup.fire()

    async def renew(self) -> None:
        """Extend every held lock; one that expired is taken back when nobody else took it."""
        held = sorted(self._held)
        if not held:
            return
        # Per-conversation keys live in different cluster slots, and cluster pipelines refuse
        # scripts: one script call per key, all in flight at once.
        args: list[str | int] = [self._owner, self._lease_ms]
        results = await asyncio.gather(*(
            self._renew_script(keys=[self._keys.conversation_lock(c)], args=args) for c in held
        ))
        for conversation_id, extended in zip(held, results, strict=True):
            if not int(extended) and conversation_id in self._held:
                await self._take_back(conversation_id)

    async def _take_back(self, conversation_id: str) -> None:
        key = self._keys.conversation_lock(conversation_id)
        if await self._client.set(key, self._owner, nx=True, px=self._lease_ms):
            log.warning("conversation_lease_expired_and_retaken", conversation_id=conversation_id)
            return
        # Another producer runs this conversation now; the fenced stream writes stop our turn.
        self._held.discard(conversation_id)
        log.warning("conversation_lease_lost", conversation_id=conversation_id)
