"""Conversation streams: the fenced writes producers make and the reads edges make.

Every write for a turn goes through a Lua script that first checks the conversation's turn record
(``Keys.turn``): only the active turn may append. An interrupt or a newer turn flips that record in
the same atomic step that appends its own marker, so once a client has seen ``interrupt`` no audio
or frames of the old turn can follow it, however late the old producer's writes arrive.

Queued turns are retried after a producer crash, and every attempt writes under the same turn id.
The turn record therefore also holds the attempt's **epoch**: a takeover bumps it atomically
(``workers.queue.records``), and every write here checks turn id *and* epoch, so a previous attempt
that
is paused rather than dead can never write again. Turns spoken directly (no queue) use epoch 0.

Every script that appends also pushes what it appended, in the same atomic step, to the
conversation's live channel (``Keys.live_channel``, sharded pub/sub): the edges deliver live
entries from that push and read the stream only to join, resume or fill a gap (docs/architecture.md
"Live delivery"). The push names the id of the entry before the first one it carries, so an edge
can tell that it missed something.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as redis
from redis.commands.core import AsyncScript

from relay import wire
from relay.errors import LockHeld, TurnFenced
from relay.keys import LIVE_CHANNEL_OF_STREAM, Keys
from relay.lua import TAKE_LOCK, ScriptArg, ScriptArgs, register, text
from relay.redis_conn import RedisClient, answer

ACTIVE = "active"
ENDED = "ended"
INTERRUPTED = "interrupted"

# Conversations whose last expiry refresh a ConversationLog remembers (bounded; see _ttl_for).
_REFRESH_MEMORY = 4096

# Lua: the live push (see the module doc). A script starts a push as ``head, body = {prev}, {}``
# with ``prev`` the stream's last id before its first XADD (``live_tip(stream)`` reads it from the
# stream itself), calls ``live_add(head, body, id, entry)`` after each XADD, and
# ``live_publish(stream, head, body)`` sends
# "<prev> <id1> <len1> <id2> <len2> ...\n<entry1><entry2>..." on the stream's live channel when
# anything was appended. The message is made by one ``table.concat``: every string a script makes
# is hashed in full when Lua interns it, so joining head and body separately first would hash and
# copy the entries once more (the append script's cost is measured in docs/benchmarks.md, "The
# append script's cost"). The predecessor must be the stream's true last entry: an edge that sees
# a push naming its own position as predecessor delivers it without reading the stream. Opening
# and interrupting read it from the stream (XREVRANGE); the append script, the hot path, takes it
# from the turn record (``last``, else ``start``): only the scripts of this module write
# conversation streams, and while a turn is active every write to its stream is an append of that
# turn, which records ``last`` (tests/core/test_streams.py checks every push). A script run again
# (a retry) appends nothing and so pushes nothing (each script's header says why); and were the
# same push ever to arrive twice, it would be harmless: edges deliver by position, so entries they
# already have are skipped (docs/architecture.md "Live delivery").
LIVE_PUSH = LIVE_CHANNEL_OF_STREAM + """
local function live_tip(stream)
  local tip = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  return tip[1] and tip[1][1] or '0-0'
end
local function live_add(head, body, id, entry)
  local n = #head
  head[n + 1], head[n + 2], head[n + 3], head[n + 4] = ' ', id, ' ', #entry
  body[#body + 1] = entry
end
local function live_publish(stream, head, body)
  if #body == 0 then return end
  local n = #head
  head[n + 1] = '\\n'
  for i = 1, #body do head[n + 1 + i] = body[i] end
  redis.call('SPUBLISH', live_channel_of(stream), table.concat(head))
end
"""

# Lua: write_start(stream, turn record, turn_id, owner, maxlen, ttl_ms, start_entry, epoch,
# first, last, head, body) appends ``start_entry`` and then ARGV[first..last] (the turn's first
# audio entries, seq 0, 1, ... in order; none when first > last), pushes them to the live channel
# with what ``head, body`` already hold, and makes the turn record say that this turn is active at
# ``epoch`` with those entries appended (``na`` and ``last``, exactly as the append script would
# have left them); returns the start entry's id. The caller has checked that the turn may open and
# passes the push it started (``head, body``, with whatever it appended before: a superseded
# turn's interrupt). Opening here and opening a queued turn at its submit
# (``workers.queue.records``) share it, so the two can never disagree on the record.
WRITE_START = LIVE_PUSH + """
local function write_start(stream, record, turn, owner, maxlen, ttl_ms, start_entry, epoch,
                           first, last_arg, head, body)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'd', start_entry)
  live_add(head, body, id, start_entry)
  local last = id
  for i = first, last_arg do
    last = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'd', ARGV[i])
    live_add(head, body, last, ARGV[i])
  end
  live_publish(stream, head, body)
  redis.call('DEL', record)
  redis.call('HSET', record, 'id', turn, 'start', id, 'status', 'active', 'owner', owner,
             'epoch', epoch)
  if last_arg >= first then redis.call('HSET', record, 'na', last_arg - first + 1, 'last', last) end
  redis.call('PEXPIRE', stream, ttl_ms)
  redis.call('PEXPIRE', record, ttl_ms)
  return id
end
"""

# KEYS: stream, turn, guard hash (the turn record itself when there is no guard), lock (the turn
# record when there is none). ARGV: turn_id, owner, maxlen, ttl_ms, start_entry,
# expected_previous, interrupt_entry_for_previous, epoch, guard field ('' for none), guard value,
# lock owner ('' for none), lock px, lock's previous holder, then the turn's first audio entries
# (seq 0, 1, ... in order; none is fine), appended right after ``turn_start`` in the same step, so
# the client's first sound needs no append call of its own; the turn record's audio watermark
# (``na``) and ``last`` then say so, exactly as if the append script had written them.
# Returns {0} when the active turn changed under the caller (retry), {1, id} on success,
# {2, start_id} when this attempt already opened the turn (idempotent re-open), {3} when the
# caller is fenced: its guard no longer holds (for a queued turn: its attempt is no longer the
# one allowed to run), or the turn already ended (a turn with an epoch never opens twice),
# {4, holder} when the lock is another's (nothing written). The lock is taken (``take_lock``)
# once the guard holds, before anything else.
# Run twice (a retried call): the second run finds the lock its own (set again) and the turn
# active at the same epoch, and answers {2, start_id}, the first run's start; nothing is written
# or pushed again, first audio included (the first run appended it, and its watermark makes any
# later append of those seqs a no-op too).
_OPEN = WRITE_START + TAKE_LOCK + """
local epoch = ARGV[8]
if ARGV[9] ~= '' and redis.call('HGET', KEYS[3], ARGV[9]) ~= ARGV[10] then
  return {3}
end
if ARGV[11] ~= '' then
  local taken, holder = take_lock(KEYS[4], ARGV[11], ARGV[12], ARGV[13])
  if not taken then return {4, holder} end
end
local cur = redis.call('HMGET', KEYS[2], 'id', 'status', 'start', 'epoch')
if cur[1] == ARGV[1] then
  if cur[2] == 'active' then
    if (cur[4] or '0') == epoch then return {2, cur[3]} end
    return {3}
  end
  if epoch ~= '0' then return {3} end
end
if cur[2] == 'active' and cur[1] ~= ARGV[6] then return {0} end
local head, body = {live_tip(KEYS[1])}, {}
if cur[2] == 'active' then
  live_add(head, body, redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[7]),
           ARGV[7])
end
return {1, write_start(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], epoch,
                      14, #ARGV, head, body)}
"""

# KEYS: stream, turn. ARGV: turn_id, epoch, maxlen, ttl_ms ('0': leave the expiry alone, see
# ``ConversationLog._ttl_for``), new_status ('' keeps it), then
# (mark, entry) pairs: ``wire.write_mark`` of each entry before it. Returns the id of the last
# entry appended, or false when the turn (at this epoch) is not the active one.
# Runs twice (a client retry after a timeout whose first attempt did reach Redis, or a caller
# that retries after an error): an entry whose mark the turn record already holds is skipped, so
# the second run appends nothing and returns the turn's last entry id, as the first run did; a
# retried end or interrupt of the turn succeeds the same way although the turn is no longer
# active. Marks are watermarks in the turn record: ``na``/``nf`` the next audio/frames seq,
# ``m:<mark>`` for the entries a turn has once; ``last`` the last entry id. Seqs of a kind only
# grow within a turn (a continued attempt goes on after the delivered ones), so a seq below its
# watermark is always one already appended, even after the stream trimmed it. A run that appends
# nothing pushes nothing, so a retried append never reaches the edges twice.
_APPEND = LIVE_PUSH + """
local cur = redis.call('HMGET', KEYS[2], 'id', 'status', 'epoch', 'na', 'nf', 'last', 'start')
if cur[1] ~= ARGV[1] or (cur[3] or '0') ~= ARGV[2] then return false end
local na, nf = tonumber(cur[4] or '0'), tonumber(cur[5] or '0')
local fresh, flags = {}, nil
for i = 6, #ARGV, 2 do
  local mark = ARGV[i]
  local kind = string.byte(mark)  -- 97: 'a' (audio), 102: 'f' (frames), see wire.write_mark
  if kind == 97 or kind == 102 then
    local seq = tonumber(string.sub(mark, 2))
    if kind == 97 and seq >= na then
      na = seq + 1
      fresh[#fresh + 1] = ARGV[i + 1]
    elseif kind == 102 and seq >= nf then
      nf = seq + 1
      fresh[#fresh + 1] = ARGV[i + 1]
    end
  elseif not (flags and flags[mark]) and redis.call('HEXISTS', KEYS[2], 'm:' .. mark) == 0 then
    flags = flags or {}
    flags[mark] = true
    fresh[#fresh + 1] = ARGV[i + 1]
  end
end
if #fresh == 0 then return cur[6] or '0-0' end
if cur[2] ~= 'active' then return false end
local head, body = {cur[6] or cur[7] or '0-0'}, {}
local last
for i = 1, #fresh do
  last = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', fresh[i])
  live_add(head, body, last, fresh[i])
end
live_publish(KEYS[1], head, body)
redis.call('HSET', KEYS[2], 'na', na, 'nf', nf, 'last', last)
if flags then
  for mark in pairs(flags) do redis.call('HSET', KEYS[2], 'm:' .. mark, '1') end
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'status', ARGV[5], 'end', last) end
if ARGV[4] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return last
"""

# Lua: interrupt_active(stream, turn, expected_turn, expected_epoch, maxlen, ttl_ms, entry)
# appends ``entry`` and marks the turn interrupted when ``expected_turn`` at ``expected_epoch`` is
# the active turn: 1; 0 when no turn is active; -1 when another turn or attempt is active now (the
# caller read a stale record: retry). Scripts that interrupt and do more in the same atomic step
# (``InterruptExtension``) start from it. It pushes its entry to the live channel like every append.
INTERRUPT_ACTIVE = LIVE_PUSH + """
local function interrupt_active(stream, turn, expected_turn, expected_epoch, maxlen, ttl_ms, entry)
  local cur = redis.call('HMGET', turn, 'id', 'status', 'epoch')
  if cur[2] ~= 'active' then return 0 end
  if cur[1] ~= expected_turn or (cur[3] or '0') ~= expected_epoch then return -1 end
  local head, body = {live_tip(stream)}, {}
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'd', entry)
  live_add(head, body, id, entry)
  live_publish(stream, head, body)
  redis.call('HSET', turn, 'status', 'interrupted', 'end', id)
  redis.call('PEXPIRE', stream, ttl_ms)
  redis.call('PEXPIRE', turn, ttl_ms)
  return 1
end
"""

# KEYS: stream, turn. ARGV: expected turn id, expected epoch, maxlen, ttl_ms, interrupt entry.
# Returns {interrupt_active's result}.
# Run twice: the second run finds the turn no longer active and answers {0}; nothing is written.
_INTERRUPT = INTERRUPT_ACTIVE + """
return {interrupt_active(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])}
"""


@dataclass(frozen=True)
class Guard:
    """A condition a turn's opening must meet, owned by the caller: ``field`` of the hash at
    ``key`` (a key of the conversation's bucket) holds ``value``. The job queue passes the field
    naming the attempt allowed to run, so a fenced attempt can never open its turn."""

    key: str
    field: str
    value: str


@dataclass(frozen=True)
class Lock:
    """A lock a turn's opening takes in its own atomic step, owned by the caller (the
    producers' conversation lock, ``workers.speech.leases``): ``key`` (a key of the
    conversation's bucket) is set to ``owner`` for ``px`` ms unless another owner than
    ``previous`` holds it."""

    key: str
    owner: str
    px: int
    previous: str = ""


@dataclass(frozen=True)
class InterruptExtension:
    """More work done in the interrupt's own atomic step, by the module that owns those records.

    ``script`` starts from ``INTERRUPT_ACTIVE`` and calls it with the log's 2 keys and 5 args
    (KEYS[1..2], ARGV[1..5], as ``_INTERRUPT`` does); ``keys`` and ``args`` follow them. It returns
    {interrupt_active's result, then its own values}, which ``InterruptOutcome.extra`` carries.
    """

    script: AsyncScript
    keys: list[str]
    args: list[ScriptArg]


@dataclass(frozen=True)
class TurnState:
    turn_id: str
    start_id: str
    status: str
    owner: str
    epoch: int = 0


@dataclass(frozen=True)
class InterruptOutcome:
    turn_id: str | None  # the turn that was interrupted, None when none was playing
    extra: tuple[Any, ...] = ()  # what an InterruptExtension's script returned after its result


@dataclass(frozen=True)
class StreamInfo:
    """What an edge needs to place a new client: the stream's tip and its trimmed history."""

    exists: bool
    last_id: str  # "0-0" when the stream does not exist
    first_id: str | None

    def can_resume_after(self, position: str) -> bool:
        """True when every entry after ``position`` is still in the stream.

        Trimming only removes the oldest entries, so nothing after ``position`` is missing while
        ``position`` is at or past the first retained entry. A position older than that, a stream
        that is gone, or a position the stream never reached (a stream recreated after loss) means
        entries may be missing, and the client must be told.
        """
        if not self.exists:
            return False
        wanted = parse_id(position)
        if wanted > parse_id(self.last_id):
            return False
        return self.first_id is None or wanted >= parse_id(self.first_id)


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence) pairs, not as strings."""
    if isinstance(entry_id, bytes):  # the edge's hot path: int() reads ASCII bytes as they are
        raw_ms, _, raw_seq = entry_id.partition(b"-")
        return int(raw_ms), int(raw_seq or 0)
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# A position a client sends: ASCII digits, both parts present. Python's int() alone would also
# take spaces, "_" and non-ASCII digits, and an empty sequence, none of which Redis accepts.
_POSITION = re.compile(r"[0-9]{1,20}-[0-9]{1,20}", re.ASCII)
_U64_MAX = 2**64 - 1


def parse_position(text: str) -> tuple[int, int]:
    """A stream position from outside (a client's ``last_id``), strictly: ``<ms>-<seq>``, each
    part ASCII digits within 64 bits, as Redis stream ids are. Raises ValueError otherwise."""
    if not isinstance(text, str) or not _POSITION.fullmatch(text):
        raise ValueError("a position is <ms>-<seq> in ASCII digits")
    ms, _, seq = text.partition("-")
    parsed = int(ms), int(seq)
    if parsed[0] > _U64_MAX or parsed[1] > _U64_MAX:
        raise ValueError("each part of a position fits in 64 bits")
    return parsed


def valid_id(entry_id: str) -> bool:
    try:
        parse_position(entry_id)
    except ValueError:
        return False
    return True



def _check_first_audio(turn_id: str, entries: Sequence[bytes]) -> None:
    """The open script records ``len(entries)`` as the next audio seq without reading them: they
    must be the turn's audio entries 0, 1, ... in order (ValueError otherwise)."""
    for seq, entry in enumerate(entries):
        kind, turn = wire.stored_kind(entry)
        if kind != wire.AUDIO or turn != turn_id or wire.write_mark(entry) != f"a{seq}":
            raise ValueError(f"first_audio[{seq}] is not audio entry {seq} of turn {turn_id}")


class ConversationLog:
    """Fenced writes to conversation streams, shared by producers and the interrupt API."""

    def __init__(self, client: RedisClient, keys: Keys, *, maxlen: int, ttl_s: int) -> None:
        self._client = client
        self._keys = keys
        self._maxlen = maxlen
        self._ttl_ms = ttl_s * 1000
        self._refreshed: dict[str, float] = {}  # conversation -> when its expiry is due again
        self._open = register(client, _OPEN)
        self._append = register(client, _APPEND)
        self._interrupt = register(client, _INTERRUPT)

    async def open_turn(
        self, conversation_id: str, turn_id: str, *, sample_rate: int, owner: str, epoch: int = 0,
        guard: Guard | None = None, lock: Lock | None = None, first_audio: Sequence[bytes] = (),
    ) -> str:
        """Start a turn; an active turn of the conversation is ended with ``interrupt`` first.

        ``epoch`` > 0 opens an attempt of a retried turn, and ``guard`` is the caller's own
        condition for it (the job queue's: this attempt is the one allowed to run): the turn is
        refused (TurnFenced) when the guard does not hold, or when it was already opened at
        another epoch. ``lock`` is taken in the same step (LockHeld, and nothing written, when
        another owner holds it). ``first_audio``: the turn's first ``audio`` entries (seq 0, 1,
        ... of ``turn_id``), appended right after ``turn_start`` in the same step; the turn's
        next append goes on from there. Returns the ``turn_start`` entry's id.
        """
        _check_first_audio(turn_id, first_audio)
        turn_key = self._keys.turn(conversation_id)
        keys = [self._keys.stream(conversation_id), turn_key, guard.key if guard else turn_key,
                lock.key if lock else turn_key]
        locking: list[ScriptArg] = [lock.owner, lock.px, lock.previous] if lock else ["", 0, ""]
        start = wire.turn_start(turn_id, sample_rate=sample_rate)
        previous = ""  # first guess, read from nowhere: the last turn ended (saves a round trip)
        for attempt in range(16):
            if attempt:  # the guess was wrong (the script changed nothing): read the record
                current = await self.current_turn(conversation_id)
                previous = current.turn_id if current and current.status == ACTIVE else ""
            superseded = wire.interrupt(previous or "-", reason="superseded")
            args: ScriptArgs = [turn_id, owner, self._maxlen, self._ttl_ms, start, previous,
                                superseded, epoch, guard.field if guard else "",
                                guard.value if guard else "", *locking, *first_audio]
            result = await self._open(keys=keys, args=args)
            code = int(result[0])
            if code == 3:
                raise TurnFenced(f"attempt {epoch} of turn {turn_id} may not open it")
            if code == 4:
                raise LockHeld(f"the lock of {conversation_id} is held", holder=text(result[1]))
            if code != 0:
                return text(result[1])
        raise TurnFenced(f"turn record of {conversation_id} kept changing; could not open turn")

    async def append(
        self, conversation_id: str, turn_id: str, *entries: bytes, epoch: int = 0
    ) -> str:
        """Append entries of ``turn_id``; raise TurnFenced if that turn (at ``epoch``) is no
        longer active."""
        return await self._write(conversation_id, turn_id, epoch, "", entries)

    async def end_turn(
        self, conversation_id: str, turn_id: str, *, status: str, epoch: int = 0
    ) -> str:
        entry = wire.turn_end(turn_id, status=status)
        return await self._write(conversation_id, turn_id, epoch, ENDED, (entry,))

    async def interrupt_turn(
        self, conversation_id: str, turn_id: str, *, epoch: int = 0, reason: str
    ) -> str:
        """Interrupt exactly this attempt of a turn (TurnFenced when it is not the active one)."""
        entry = wire.interrupt(turn_id, reason=reason)
        last = await self._write(conversation_id, turn_id, epoch, INTERRUPTED, (entry,))
        await self._publish_stop(conversation_id, turn_id)
        return last

    async def interrupt(self, conversation_id: str, *, reason: str = "interrupted") -> str | None:
        """Interrupt the active turn; return its id, or None when no turn was active."""
        outcome = await self.interrupt_with(conversation_id, reason=reason)
        return outcome.turn_id

    async def interrupt_with(
        self, conversation_id: str, *, reason: str = "interrupted",
        extension: InterruptExtension | None = None,
    ) -> InterruptOutcome:
        """Interrupt the active turn and run ``extension`` (if any) in the same atomic step."""
        keys = [self._keys.stream(conversation_id), self._keys.turn(conversation_id)]
        script = self._interrupt
        if extension is not None:
            keys, script = keys + extension.keys, extension.script
        for _ in range(16):
            current = await self.current_turn(conversation_id)
            active = current if current is not None and current.status == ACTIVE else None
            turn_id, epoch = (active.turn_id, active.epoch) if active else ("", 0)
            entry = wire.interrupt(turn_id or "-", reason=reason)
            args: list[ScriptArg] = [turn_id, epoch, self._maxlen, self._ttl_ms, entry]
            if extension is not None:
                args += extension.args
            result = await script(keys=keys, args=args)
            hit = int(result[0])
            if hit < 0:
                continue  # the turn or its attempt changed between the read and the script
            if hit == 1:
                await self._publish_stop(conversation_id, turn_id)
            return InterruptOutcome(turn_id=turn_id if hit else None, extra=tuple(result[1:]))
        raise TurnFenced(f"turn record of {conversation_id} kept changing; could not interrupt")

    async def _publish_stop(self, conversation_id: str, turn_id: str) -> None:
        """Tell the producer running the turn to stop now (it would stop at its next fenced write
        anyway). A plain PUBLISH command: the async cluster client has no publish() method."""
        channel = self._keys.control_channel(conversation_id)
        await self._client.execute_command("PUBLISH", channel, turn_id.encode())

    def append_call(self, conversation_id: str, turn_id: str, *entries: bytes,
                    epoch: int = 0) -> list[ScriptArg]:
        """The ``EVALSHA`` command ``append`` sends, for a load generator that pipelines it over
        a connection of its own (``relay bench``); the reply is the last id, or nil when fenced.
        The script must be loaded first (``load_scripts``)."""
        keys, args = self._append_args(conversation_id, turn_id, epoch, "", entries)
        return ["EVALSHA", self._append.sha, len(keys), *keys, *args]

    async def load_scripts(self) -> None:
        for script in (self._open, self._append, self._interrupt):
            await cast(Any, self._client).script_load(script.script)

    def _append_args(
        self, conversation_id: str, turn_id: str, epoch: int, status: str,
        entries: tuple[bytes, ...],
    ) -> tuple[list[str], list[ScriptArg]]:
        keys = [self._keys.stream(conversation_id), self._keys.turn(conversation_id)]
        args: list[ScriptArg] = [turn_id, epoch, self._maxlen,
                                 self._ttl_for(conversation_id, status), status]
        for entry in entries:
            args += (wire.write_mark(entry), entry)
        return keys, args

    async def _write(
        self, conversation_id: str, turn_id: str, epoch: int, status: str,
        entries: tuple[bytes, ...],
    ) -> str:
        keys, args = self._append_args(conversation_id, turn_id, epoch, status, entries)
        result = await self._append(keys=keys, args=args)
        if result is None:
            raise TurnFenced(f"turn {turn_id} of {conversation_id} is no longer active")
        return text(result)

    def _ttl_for(self, conversation_id: str, status: str) -> int:
        """The expiry an append sets, or 0 to leave it: refreshing it on every append cost Redis
        two commands per call for nothing. Opening, ending and interrupting a turn always
        refresh; an append refreshes when this process last did so for the conversation more than
        a quarter of the ttl ago. So a stream being written never expires (its expiry stays at
        least 3/4 of the ttl ahead of every write) and an idle one expires between 3/4 and 1 ttl
        after its last write, as docs/operations.md says."""
        now = time.monotonic()
        if status == "":
            due = self._refreshed.get(conversation_id)
            if due is not None and now < due:
                return 0
        if len(self._refreshed) >= _REFRESH_MEMORY:
            self._refreshed.clear()  # forgetting only costs an early refresh
        self._refreshed[conversation_id] = now + self._ttl_ms / 4000
        return self._ttl_ms

    async def current_turn(self, conversation_id: str) -> TurnState | None:
        return await read_turn(self._client, self._keys, conversation_id)


async def read_turn(client: RedisClient, keys: Keys, conversation_id: str) -> TurnState | None:
    raw = await answer(client.hgetall(keys.turn(conversation_id)))
    if not raw:
        return None
    record = {text(k): text(v) for k, v in raw.items()}
    return TurnState(
        turn_id=record.get("id", ""),
        start_id=record.get("start", "0-0"),
        status=record.get("status", ""),
        owner=record.get("owner", ""),
        epoch=int(record.get("epoch") or 0),
    )


async def stream_info(client: RedisClient, keys: Keys, conversation_id: str) -> StreamInfo:
    try:
        info = await client.xinfo_stream(keys.stream(conversation_id))
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return StreamInfo(exists=False, last_id="0-0", first_id=None)
        raise
    first = info.get("first-entry")
    return StreamInfo(
        exists=True,
        last_id=text(info["last-generated-id"]),
        first_id=text(first[0]) if first else None,
    )


async def read_after(
    client: RedisClient, keys: Keys, conversation_id: str, after_id: str, *, count: int
) -> list[tuple[str, bytes]]:
    """Entries strictly after ``after_id`` (oldest first), at most ``count``."""
    rows = await client.xrange(
        keys.stream(conversation_id), min=f"({after_id}", max="+", count=count
    )
    return [(text(entry_id), fields[b"d"]) for entry_id, fields in rows]


async def read_from(
    client: RedisClient, keys: Keys, conversation_id: str, start_id: str, *, count: int
) -> list[tuple[str, bytes]]:
    """Entries from ``start_id`` inclusive (oldest first), at most ``count``."""
    rows = await client.xrange(keys.stream(conversation_id), min=start_id, max="+", count=count)
    return [(text(entry_id), fields[b"d"]) for entry_id, fields in rows]
