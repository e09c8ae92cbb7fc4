"""A conversation's queued turns in Redis: FIFO, attempt claims, and the lease of its runner.

Every key here carries the conversation's hash tag, so each step below is one Lua script on one
slot, atomic together with the turn record the fenced stream writes check (``relay.streams``):

* ``Keys.queue(c)``: stream of queued turn jobs, oldest first (fields ``turn``, ``job``: the job
  of ``workers.queue``, and ``deadline``: unix ms, from the server clock at submit).
* ``Keys.queued_audio(c, turn)``: the PCM of a queued clip over ``INLINE_CLIP_MAX`` (a version 2
  job; see ``workers.queue.jobs``), removed with the turn. No script here passes it: a script pays
  Redis for every byte that goes through Lua (about 0.6 to 0.9 us per KB on the bench machine: 1.6
  to 2.1 ms to submit a 10 s clip at 48 kHz, 0.9 to 1.2 ms to take it, ``relay bench
  --queue-cost``), while a plain SET or GET of the same bytes costs a small part of that, and one
  script's time is every other client's wait. A submit uploads the
  clip with a plain SET to a key of its own (``queued_audio_upload``), in the same round trip and
  just before its script, which renames it into place when it queues the turn (RENAME moves the
  value without reading it) and deletes it otherwise; a worker reads it with a plain GET sent
  beside its take or claim.
* ``Keys.queue_state(c)``: hash. ``a:<turn>`` attempts started (present while the turn is queued:
  submits are idempotent per turn id), ``err:<turn>`` the last attempt's error, ``epoch`` a counter
  that never repeats, and ``run`` = ``<turn>/<epoch>``: the one attempt allowed to run now;
  ``claim``, ``claimed_from`` and ``stepped`` only let a retried claim or step-back answer as its
  first run did (every script here says what a second run does: redis-py retries commands);
  ``h:<turn>`` = ``<audio entries> <audio bytes> <ended 0|1>``: what a submit that opened the turn
  appended (``OPEN_AT_SUBMIT``), which the first claim hands its worker instead of the worker
  reading it back from the stream.
* ``Keys.queue_runner(c)``: ``<owner>|<doorbell id>`` with an expiry: the worker running the
  queue, and the doorbell in the jobs group that backs it (``workers.queue.doorbells``). Whoever
  ends up
  owning that doorbell after a crash may take the runner lease over.

A claim bumps the epoch and writes it into the active turn record in the same step, so the
previous attempt of a turn that is paused rather than dead is fenced out before the new one
reads what was already delivered.

A submit on a single server may also open its turn at once (``OPEN_AT_SUBMIT``): it bumps the
epoch as a claim would and writes the turn's start and first audio, and the worker's claim then
continues the turn like one an earlier attempt opened (docs/architecture.md "Opening at submit").
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, cast

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from relay.keys import Keys
from relay.lua import NOW_MS, ScriptArg, ScriptArgs, register, text
from relay.redis_conn import RedisClient, answer, in_order
from relay.streams import INTERRUPT_ACTIVE, WRITE_START, Guard, InterruptExtension

# "<turn>/<epoch>": the attempt of a queued turn allowed to run now (``run`` in the queue state).
# Turn ids cannot contain "/", so the pair is unambiguous.
RUN_FIELD = "run"
ATTEMPTS_PREFIX = "a:"  # a:<turn> in the queue state: attempts started
RUN_SEPARATOR = "/"


def run_value(turn_id: str, epoch: int) -> str:
    return f"{turn_id}{RUN_SEPARATOR}{epoch}"

# A clip's upload outlives its submit call by this much at most: the call's own script renames or
# deletes it at once, so only the upload of a call cut off before its script waits for expiry.
_UPLOAD_TTL_MS = 60_000

# Turns remembered as done per conversation (and for at most the queue's ttl): a job that another
# queue system delivers again after its turn left the queue is ignored within these bounds.
DONE_KEEP = 1000

# Lua: remember_done(done key, turn, ttl_ms) records a turn that left the queue
# (``Keys.turns_done``) and keeps the set bounded; the script must define ``now`` (server ms) first.
REMEMBER_DONE = """
local function remember_done(done, turn, ttl_ms)
  redis.call('ZADD', done, now, turn)
  redis.call('ZREMRANGEBYSCORE', done, '-inf', now - ttl_ms)
  redis.call('ZREMRANGEBYRANK', done, 0, -1 - DONE_KEEP)
  redis.call('PEXPIRE', done, ttl_ms)
end
""".replace("DONE_KEEP", str(DONE_KEEP))



# KEYS: stream, turn (the log's, see ``relay.streams.InterruptExtension``), queue, queue state,
# done. ARGV: the log's five, then queue_ttl_ms, the conversation's ``Keys.queued_audio_prefix``.
# Interrupts the active turn and drops every turn queued for the conversation in the same step,
# so turns queued after the call are kept. Dropped turns count as done, and their clips go with
# them (keys named from the prefix: each is in the conversation's slot, as the declared keys);
# the queue state keeps its epoch counter: epochs never repeat.
# Returns {interrupt_active's result, dropped turns}; {-1} when the turn changed under the caller.
# Run twice: the second run finds no active turn and an empty queue (or turns queued since, which
# a retried interrupt drops as a new interrupt would); nothing is written twice.
_INTERRUPT_AND_DROP = NOW_MS + REMEMBER_DONE + INTERRUPT_ACTIVE + """
local hit = interrupt_active(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if hit < 0 then return {hit} end
local ttl = tonumber(ARGV[6])
local dropped = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[3], '-', '+')) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'turn' then
      remember_done(KEYS[5], fields[i + 1], ttl)
      redis.call('DEL', ARGV[7] .. fields[i + 1])
    end
  end
  dropped = dropped + 1
end
redis.call('DEL', KEYS[3])
local epoch = redis.call('HGET', KEYS[4], 'epoch')
redis.call('DEL', KEYS[4])
if epoch then
  redis.call('HSET', KEYS[4], 'epoch', epoch)
  redis.call('PEXPIRE', KEYS[4], ttl)
end
return {hit, dropped}
"""

# Lua: open_at_submit(keys) opens a just-queued clip turn at once, when its conversation is idle,
# so the client's first sound waits for no worker (docs/architecture.md "Opening at submit").
# ``keys`` = {stream, turn record, runner lease, conversation lock, session leases, the session cap
# the producers published, the kept sessions' marks}; ARGV[7..]: owner, maxlen, stream ttl_ms, the
# session cap to use when none is published, the conversation id, what the first audio holds
# (``h:<turn>`` in the state), the ``turn_start`` entry, then the turn's first audio entries
# (ARGV[6] counts them all). Idle means: this turn is the only one queued, no worker runs the queue
# (runner lease), no producer speaks in it (conversation lock), no turn is active, and fewer Motion
# Server sessions than the cap are held, or the conversation's own kept session (its mark names a
# lease still in the set) holds one (otherwise a worker could not start the turn at once, and its
# clients would hear its first audio, then wait). It bumps the epoch, exactly as a claim does, and
# writes the start and first audio as that attempt (not counted: ``a:<turn>`` stays 0), so a
# worker's claim finds the turn active and continues it after what clients have
# (``ClaimKind.RESUME``), fencing this write's epoch like any earlier attempt's.
OPEN_AT_SUBMIT = WRITE_START + """
local function open_at_submit(k)
  if redis.call('XLEN', KEYS[1]) ~= 1 then return false end
  if redis.call('EXISTS', k[3]) == 1 or redis.call('EXISTS', k[4]) == 1 then return false end
  if redis.call('HGET', k[2], 'status') == 'active' then return false end
  local cap = tonumber(redis.call('GET', k[6]) or ARGV[10])
  if redis.call('ZCARD', k[5]) >= cap then
    local own = redis.call('HGET', k[7], ARGV[11])
    if not own or not redis.call('ZSCORE', k[5], own) then return false end
  end
  local epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1)
  redis.call('HSET', KEYS[2], 'h:' .. ARGV[1], ARGV[12])
  write_start(k[1], k[2], ARGV[1], ARGV[7], ARGV[8], ARGV[9], ARGV[13], tostring(epoch), 14,
              6 + tonumber(ARGV[6]), {live_tip(k[1])}, {})
  return true
end
"""

# KEYS: queue, state, done, [the jobs stream: _SUBMIT_AND_RING only], then, to open at submit,
# open_at_submit's seven keys, then for a clip its upload and its ``queued_audio`` key. ARGV: turn,
# job, deadline_in_ms (0: none), max_queued, ttl_ms, the count of open_at_submit's arguments (0:
# do not open), those arguments. Returns {1, entry id}, {3, entry id} when it also opened the
# turn, {0} when the turn is already queued, {2} when it already left the queue (played, dead or
# dropped), {-1} when the queue is full, {-3} when the clip's upload is missing (its SET failed:
# nothing written). The upload becomes the turn's audio only when the turn is queued here, and is
# deleted otherwise.
# Run twice: the second run finds the turn queued ({0}) or, if it ran meanwhile, done ({2}), and
# deletes the upload the retried call wrote again; nothing is queued twice, the audio of a
# queued turn is never replaced, and a turn opened at submit is not opened again (nor its first
# audio appended again: the answer {0} comes before open_at_submit is reached).
_SUBMIT_TURN = NOW_MS + OPEN_AT_SUBMIT + """
local opens = tonumber(ARGV[6]) > 0
local function key_at(base)
  if opens then return KEYS[base + 7] end
  return KEYS[base]
end
local function submit_turn(base)
  local upload, audio = key_at(base + 1), key_at(base + 2)
  local function refuse(answer)
    if upload then redis.call('DEL', upload) end
    return answer
  end
  if upload and redis.call('EXISTS', upload) == 0 then return {-3} end
  if redis.call('HEXISTS', KEYS[2], 'a:' .. ARGV[1]) == 1 then return refuse({0}) end
  if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return refuse({2}) end
  if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[4]) then return refuse({-1}) end
  local fields = {'turn', ARGV[1], 'job', ARGV[2]}
  if tonumber(ARGV[3]) > 0 then
    table.insert(fields, 'deadline')
    table.insert(fields, tostring(now + tonumber(ARGV[3])))
  end
  local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
  redis.call('HSET', KEYS[2], 'a:' .. ARGV[1], 0)
  if upload then
    redis.call('RENAME', upload, audio)
    redis.call('PEXPIRE', audio, ARGV[5])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  if opens and open_at_submit({KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], KEYS[base + 4],
                               KEYS[base + 5], KEYS[base + 6], KEYS[base + 7]}) then
    return {3, id}
  end
  return {1, id}
end
"""
_SUBMIT = _SUBMIT_TURN + "return submit_turn(3)\n"

# The same with its doorbell, in one atomic step, where the jobs stream can be named with the
# conversation's keys (a single server; on a cluster it lives in another slot, and the doorbell is
# a second call after this one). KEYS: queue, state, done, jobs, then as _SUBMIT. ARGV: as
# _SUBMIT, then the most doorbells that may wait, the field/value pair that marks a doorbell
# whose turn this step opened, then the doorbell's field/value pairs. Returns {-2} when that many
# wait (nothing written, the upload deleted), else _SUBMIT's answer; a queued turn, new ({1},
# {3}: with the mark) or already queued ({0}), gets its doorbell.
# Run twice: the turn is not queued again ({0} or {2}, as for _SUBMIT), and an already queued
# turn gets one more doorbell, exactly as a caller's second submit gets one: a spare doorbell
# costs one entry (its worker finds the runner busy or the queue already run) and repairs a lost
# one.
_SUBMIT_AND_RING = _SUBMIT_TURN + """
local ring = 7 + tonumber(ARGV[6])
if redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[ring]) then
  local upload = key_at(5)
  if upload then redis.call('DEL', upload) end
  return {-2}
end
local queued = submit_turn(4)
if queued[1] == 0 or queued[1] == 1 or queued[1] == 3 then
  local bell = {unpack(ARGV, ring + 3)}
  if queued[1] == 3 then
    table.insert(bell, ARGV[ring + 1])
    table.insert(bell, ARGV[ring + 2])
  end
  redis.call('XADD', KEYS[4], '*', unpack(bell))
end
return queued
"""

# Lua: claim(state, turn record, queue, turn, owner, max_attempts, ttl_ms, deadline_ms (0: none),
# claim id (unique per call)) counts the attempt, makes it the one allowed to run, and fences any
# earlier attempt of an active turn. Returns {kind, epoch, attempts, start id, previous owner,
# status, what the turn's submit appended when it opened the turn (``h:<turn>``; '' if it did
# not)}. The script must define ``now`` (server ms) first.
# Run twice: the claim id is kept in the state (``claim``), and a second run with the same id
# counts nothing and bumps no epoch: it answers the first run's epoch and attempts (a retried
# claim would otherwise burn an attempt and send a turn to the dead letters early).
CLAIM_TURN = """
local function claim(state, record, queue, turn, owner, max_attempts, ttl_ms, deadline, claim_id)
  local a_key = 'a:' .. turn
  if redis.call('HEXISTS', state, a_key) == 0 then return {'gone', 0, 0, '', '', '', ''} end
  local attempts, epoch
  local again = redis.call('HGET', state, 'claim') == claim_id
  if again then
    attempts = tonumber(redis.call('HGET', state, a_key))
    epoch = tonumber(redis.call('HGET', state, 'epoch'))
  else
    attempts = redis.call('HINCRBY', state, a_key, 1)
    epoch = redis.call('HINCRBY', state, 'epoch', 1)
  end
  redis.call('HSET', state, 'run', turn .. '/' .. epoch, 'claim', claim_id)
  redis.call('PEXPIRE', state, ttl_ms)
  redis.call('PEXPIRE', queue, ttl_ms)
  local cur = redis.call('HMGET', record, 'id', 'status', 'start', 'owner')
  local over = attempts > tonumber(max_attempts)
  if cur[1] == turn then
    if cur[2] ~= 'active' then return {'finished', epoch, attempts, cur[3], '', cur[2], ''} end
    -- the owner before the first run (a second run would see the caller itself)
    local previous = cur[4] or ''
    if again then previous = redis.call('HGET', state, 'claimed_from') or '' end
    redis.call('HSET', state, 'claimed_from', previous)
    redis.call('HSET', record, 'epoch', epoch, 'owner', owner)
    local submitted = redis.call('HGET', state, 'h:' .. turn) or ''
    return {over and 'dead' or 'resume', epoch, attempts, cur[3], previous, 'active', submitted}
  end
  if over then return {'dead', epoch, attempts, '', '', '', ''} end
  deadline = tonumber(deadline)
  if deadline > 0 and now > deadline then return {'expired', epoch, attempts, '', '', '', ''} end
  return {'fresh', epoch, attempts, '', '', '', ''}
end
"""

# KEYS: state, turn record, queue. ARGV: turn, owner, max_attempts, ttl_ms, deadline_ms, claim id.
# ``claim`` above, for a head the caller read; run twice: as ``claim``.
_CLAIM = NOW_MS + CLAIM_TURN + """
return claim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""

# KEYS: queue, state, done, the turn's ``queued_audio``, its input stream (``turn_input``).
# ARGV: turn, epoch, queue entry id, ttl_ms. Removes a finished turn, its clip and its input with
# it. Returns 1, or 0 when it was dropped meanwhile (interrupt; its input is removed too), or -1
# when another attempt runs it (whose input it is now).
# Run twice: the second run finds the turn no longer queued and answers 0, which callers treat
# as the turn having left the queue (as it has); deleting the input again changes nothing.
_FINISH = NOW_MS + REMEMBER_DONE + """
local a_key = 'a:' .. ARGV[1]
if redis.call('HEXISTS', KEYS[2], a_key) == 0 then
  redis.call('DEL', KEYS[5])
  return 0
end
if redis.call('HGET', KEYS[2], 'run') ~= ARGV[1] .. '/' .. ARGV[2] then return -1 end
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[4], KEYS[5])
redis.call('HDEL', KEYS[2], a_key, 'run', 'err:' .. ARGV[1], 'h:' .. ARGV[1])
remember_done(KEYS[3], ARGV[1], tonumber(ARGV[4]))
return 1
"""

# KEYS: state. ARGV: turn, epoch, error ('' for a hand-back: the attempt is not counted).
# Ends this attempt without finishing the turn. Returns 1, or 0 when it was no longer running.
# Run twice: the attempt is remembered in ``stepped``, so the second run answers 1 again without
# counting a hand-back twice (which would give the turn an attempt it never had).
_STEP_BACK = """
local attempt = ARGV[1] .. '/' .. ARGV[2]
if redis.call('HGET', KEYS[1], 'run') ~= attempt then
  if redis.call('HGET', KEYS[1], 'stepped') == attempt then return 1 end
  return 0
end
redis.call('HDEL', KEYS[1], 'run')
redis.call('HSET', KEYS[1], 'stepped', attempt)
if ARGV[3] == '' then
  redis.call('HINCRBY', KEYS[1], 'a:' .. ARGV[1], -1)
else
  redis.call('HSET', KEYS[1], 'err:' .. ARGV[1], ARGV[3])
end
return 1
"""

# Runner lease: value "<owner>|<doorbell>"; doorbell ids never contain "|".
_SPLIT = """
local function split(v)
  local at = string.find(v, '|[^|]*$')
  return string.sub(v, 1, at - 1), string.sub(v, at + 1)
end
"""

# KEYS: runner, queue, state, turn record. ARGV: owner, doorbell, lease_ms, then for a claim of
# the head (empty: none) max_attempts, ttl_ms, claim id. Returns {1, ''} taken, {2, previous
# owner} taken over (the caller now owns the doorbell that backed it), {3, owner} held by the
# caller under another doorbell, {0, holder} held by another worker. Taken or taken over, the
# queue's head entry follows ({code, holder, id, {field, value, ...}}): the new runner's first
# head read comes with its lease, one round trip fewer on the way to a turn's first audio. With
# the claim arguments a taken (not taken over) head is also claimed, as ``claim`` would, and its
# answer follows: one more round trip fewer, for a runner whose turn needs no session slot.
# Run twice: the second run finds the caller's own value, renews it and answers {1, ''} (taken),
# not "taken over" from the caller itself, with the head as it is then (reading it writes
# nothing) and the claim as its first run answered it (the claim id makes ``claim`` idempotent).
_TAKE = NOW_MS + CLAIM_TURN + _SPLIT + """
local function taken(code, holder)
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  if not head then return {code, holder} end
  if code ~= 1 or ARGV[4] == nil or ARGV[4] == '' then return {code, holder, head[1], head[2]} end
  local turn, deadline = '', '0'
  for i = 1, #head[2], 2 do
    if head[2][i] == 'turn' then turn = head[2][i + 1] end
    if head[2][i] == 'deadline' then deadline = head[2][i + 1] end
  end
  return {code, holder, head[1], head[2],
          claim(KEYS[3], KEYS[4], KEYS[2], turn, ARGV[1], ARGV[4], ARGV[5], deadline, ARGV[6])}
end
local v = redis.call('GET', KEYS[1])
local value = ARGV[1] .. '|' .. ARGV[2]
if v == value or not v then
  redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
  return taken(1, '')
end
local holder, backing = split(v)
if backing == ARGV[2] then
  redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
  return taken(2, holder)
end
if holder == ARGV[1] then return {3, holder} end
return {0, holder}
"""

# KEYS: runner. ARGV: value, lease_ms. 1 when extended, 0 when the lease is someone else's now.
# Run twice: extends the same lease again.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: runner, queue. ARGV: value. 1 released (queue empty), 0 kept (turns wait), -1 lost.
# Run twice: the second run finds no lease and an empty queue, and answers 1 again (a runner
# told "lost" would go on as if another worker ran the conversation).
_RELEASE_IF_EMPTY = """
local v = redis.call('GET', KEYS[1])
if not v and redis.call('XLEN', KEYS[2]) == 0 then return 1 end
if v ~= ARGV[1] then return -1 end
if redis.call('XLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: runner. ARGV: value. Drops the lease if the caller still holds it.
# Run twice: the second run finds no lease of the caller's and does nothing.
_GIVE_UP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ClaimKind(StrEnum):
    GONE = "gone"  # dropped (interrupt) between reading the head and claiming it
    FINISHED = "finished"  # an earlier attempt ended the turn; only the queue entry is left
    DEAD = "dead"  # attempts exhausted: dead-letter it
    EXPIRED = "expired"  # its deadline passed before it started: dead-letter it
    FRESH = "fresh"  # nothing of it was delivered yet: open it
    RESUME = "resume"  # an earlier attempt opened it: continue after what was delivered


@dataclass(frozen=True)
class SubmittedAudio:
    """What a submit that opened its turn appended after the ``turn_start``: that many audio
    entries (seq 0 on), that many bytes of the clip, the last one ending the audio or not."""

    entries: int
    audio_bytes: int
    ended: bool

    def encode(self) -> str:
        return f"{self.entries} {self.audio_bytes} {int(self.ended)}"

    @classmethod
    def decode(cls, raw: str) -> SubmittedAudio:
        entries, audio_bytes, ended = raw.split()
        return cls(int(entries), int(audio_bytes), ended == "1")


@dataclass(frozen=True)
class Claim:
    kind: ClaimKind
    epoch: int
    attempts: int
    start_id: str  # the turn_start entry of an opened turn, else ""
    previous_owner: str  # the producer that last ran an opened turn, else ""
    opened: bool  # the turn is active in the conversation stream
    # The first claim of a turn opened at submit: all that is in the stream of it (nobody else
    # wrote at the submit's epoch), so the worker need not read it back. None otherwise.
    submitted: SubmittedAudio | None = None


@dataclass(frozen=True)
class QueuedTurn:
    entry_id: str
    turn_id: str
    job: bytes  # decode with workers.queue.decode_job
    deadline_ms: int  # 0: none
    # A version 2 clip's PCM when it was read with the entry (``JobStore.audio_of``); None: not
    # read (or none: a streamed job, a v1 job carrying its own).
    audio: bytes | None = None


class RunnerTake(StrEnum):
    TAKEN = "taken"
    TAKEN_OVER = "taken_over"
    MINE = "mine"  # this worker already runs the conversation (under another doorbell)
    BUSY = "busy"  # another worker runs it and will see every turn queued before now


@dataclass(frozen=True)
class Take:
    """What ``JobStore.take`` found: the outcome, the holder it names (the previous owner when
    taken over, the current one when busy), and, when the caller now runs the conversation, the
    queue's head read in the same step (None: the queue was empty) and, when asked for and the
    lease was taken (not taken over), that head's claim."""

    kind: RunnerTake
    holder: str
    head: QueuedTurn | None = None
    claim: Claim | None = None

    @property
    def runs(self) -> bool:
        return self.kind in (RunnerTake.TAKEN, RunnerTake.TAKEN_OVER)



class Enqueued(IntEnum):
    """What ``_SUBMIT`` answered."""

    ALREADY_QUEUED = 0  # queued or running under that turn id: nothing changed
    QUEUED = 1
    ALREADY_DONE = 2  # the turn id already left the queue: not played again
    OPENED = 3  # queued, and opened at once with its first audio (``OpenAtSubmit``)
    FULL = -1  # the conversation holds queue_max turns
    JOBS_FULL = -2  # max_jobs doorbells wait (``enqueue`` with a doorbell): nothing was written


# The owner a turn opened at submit has in its turn record, until a worker's claim makes it its
# own (the claim's ``previous_owner`` then says where the turn came from).
SUBMIT_OWNER = "submit"


@dataclass(frozen=True)
class OpenAtSubmit:
    """What a submit needs to open its turn at once (``JobStore.enqueue``): the turn record's
    owner, the stream's maxlen and expiry, the session cap to check when no producer published
    one (``Keys.sdk_session_cap``), and the entries to append: the ``turn_start``, then the
    turn's first audio entries (seq 0, 1, ... in order)."""

    owner: str
    maxlen: int
    ttl_ms: int
    session_cap: int
    entries: tuple[bytes, ...]
    audio: SubmittedAudio  # what ``entries`` hold after the ``turn_start``


class Finished(IntEnum):
    """What ``_FINISH`` answered."""

    DROPPED = 0  # the turn was dropped (interrupt) while it ran
    DONE = 1
    TAKEN_OVER = -1  # another attempt runs the turn now


class Released(IntEnum):
    """What ``_RELEASE_IF_EMPTY`` answered."""

    WAITING = 0  # turns are waiting: keep running
    RELEASED = 1  # the queue is empty and the runner lease is gone
    LOST = -1  # the lease was someone else's


@dataclass(frozen=True)
class DoorbellWrite:
    """A doorbell ``enqueue`` writes with its turn, laid out by ``workers.queue.doorbells`` (the
    owner of that stream): the stream's key, how many doorbells may wait there at most (more:
    the submit is refused), and the entry's field/value pairs."""

    key: str
    max_waiting: int
    fields: tuple[ScriptArg, ...]
    # The field/value pair added when the same step opened the turn (``Enqueued.OPENED``).
    opened: tuple[ScriptArg, ScriptArg]


def _claim_of(reply: list[Any]) -> Claim:
    kind, epoch, attempts, start, previous, status, submitted = reply
    # Only the claim that takes the turn from its submit: a later one continues after whatever
    # the attempt before it wrote, which only the stream says.
    from_submit = text(previous) == SUBMIT_OWNER and text(submitted)
    return Claim(kind=ClaimKind(text(kind)), epoch=int(epoch), attempts=int(attempts),
                 start_id=text(start), previous_owner=text(previous),
                 opened=text(status) == "active",
                 submitted=SubmittedAudio.decode(text(submitted)) if from_submit else None)


def _queued_turn(entry_id: bytes | str, fields: dict[bytes, bytes]) -> QueuedTurn:
    return QueuedTurn(entry_id=text(entry_id), turn_id=text(fields.get(b"turn", b"")),
                      job=fields.get(b"job", b""),
                      deadline_ms=int(fields.get(b"deadline", b"0") or 0))


class JobStore:
    """The per-conversation side of the job queue; see the module docstring for the layout.

    :param ttl_s: a conversation's queue keys expire this long after their last change.
    :param lease_s: how long a runner lease outlives its holder's last renewal.
    """

    def __init__(self, client: RedisClient, keys: Keys, *, ttl_s: int, lease_s: float,
                 max_attempts: int = 3, queue_max: int = 64) -> None:
        if ttl_s <= 0 or lease_s <= 0 or max_attempts <= 0 or queue_max <= 0:
            raise ValueError("ttl_s, lease_s, max_attempts and queue_max must be positive")
        self._client = client
        self._keys = keys
        self._ttl_ms = ttl_s * 1000
        self._lease_ms = int(lease_s * 1000)
        self._max_attempts = max_attempts
        self._queue_max = queue_max
        self._submit, self._claim, self._finish = (
            register(client, _SUBMIT), register(client, _CLAIM), register(client, _FINISH))
        self._step_back, self._take, self._renew = (
            register(client, _STEP_BACK), register(client, _TAKE), register(client, _RENEW))
        self._release = register(client, _RELEASE_IF_EMPTY)
        self._submit_and_ring = register(client, _SUBMIT_AND_RING)
        self._give_up = register(client, _GIVE_UP)
        self._interrupt_and_drop = register(client, _INTERRUPT_AND_DROP)

    @property
    def keys(self) -> Keys:
        return self._keys

    # Submitting.

    async def enqueue(self, conversation_id: str, turn_id: str, job: bytes,
                      *, deadline_in_ms: int = 0, doorbell: DoorbellWrite | None = None,
                      audio: bytes | None = None,
                      opening: OpenAtSubmit | None = None) -> Enqueued:
        """Queue a turn (a second submit of the same turn id changes nothing). With
        ``doorbell`` (a single server only: its stream must be nameable in the same script) the
        doorbell is written in the same atomic step, unless ``doorbell.max_waiting`` wait.
        ``audio``: a clip's PCM (its ``job`` a version 2 one, without it), uploaded in the same
        round trip and kept beside the queue entry (see the module doc). ``opening`` (a single
        server only, as it names the session leases): open the turn in the same step when the
        conversation is idle (``Enqueued.OPENED``; ``OPEN_AT_SUBMIT`` says when)."""
        keys = [self._keys.queue(conversation_id), self._keys.queue_state(conversation_id),
                self._keys.turns_done(conversation_id)]
        args: list[ScriptArg] = [turn_id, job, max(0, deadline_in_ms), self._queue_max,
                                 self._ttl_ms]
        script = self._submit
        if doorbell is not None:
            script = self._submit_and_ring
            keys.append(doorbell.key)
        if opening is None:
            args.append(0)
        else:
            keys += [self._keys.stream(conversation_id), self._keys.turn(conversation_id),
                     self._keys.queue_runner(conversation_id),
                     self._keys.conversation_lock(conversation_id), self._keys.sdk_sessions(),
                     self._keys.sdk_session_cap(), self._keys.sdk_kept()]
            opened: list[ScriptArg] = [opening.owner, opening.maxlen, opening.ttl_ms,
                                       opening.session_cap, conversation_id,
                                       opening.audio.encode(), *opening.entries]
            args += [len(opened), *opened]
        if doorbell is not None:
            args += [doorbell.max_waiting, *doorbell.opened, *doorbell.fields]
        if audio is None:
            result = await script(keys=keys, args=args)
        else:
            result = await self._upload_and_run(script, conversation_id, turn_id, audio,
                                                keys, args)
        if int(result[0]) == -3:
            raise RedisError("the clip's upload was not stored (Redis refused the SET?); "
                             "nothing was queued: submit again")
        return Enqueued(int(result[0]))

    async def _upload_and_run(self, script: AsyncScript, conversation_id: str, turn_id: str,
                              audio: bytes, keys: list[str], args: list[ScriptArg]) -> Any:
        """SET the clip to an upload key of this call, then run the submit script, in this order
        in one round trip. redis-py's retries resend both (the same nonce): the SET again, then a
        script that finds the turn queued and deletes the upload."""
        upload = self._keys.queued_audio_upload(conversation_id, uuid.uuid4().hex)
        keys = [*keys, upload, self._keys.queued_audio(conversation_id, turn_id)]
        commands: list[tuple[Any, ...]] = [
            ("SET", upload, audio, "PX", _UPLOAD_TTL_MS),
            ("EVALSHA", script.sha, len(keys), *keys, *args)]
        for _ in range(2):
            stored, result = await in_order(self._client, commands)
            if isinstance(result, NoScriptError):  # Redis restarted or flushed its scripts
                await cast(Any, self._client).script_load(script.script)
                continue
            for reply in (stored, result):
                if isinstance(reply, Exception):
                    raise reply
            return result
        raise RedisError("the submit script could not be loaded")

    async def audio_bytes(self, conversation_id: str, turn_id: str) -> int:
        """The size of a queued clip's stored PCM, 0 when none is stored (for operators)."""
        key = self._keys.queued_audio(conversation_id, turn_id)
        return int(await answer(self._client.strlen(key)))

    async def audio_of(self, conversation_id: str, turn_id: str) -> bytes | None:
        """A queued clip turn's PCM (version 2 jobs), or None: a streamed or v1 job, or a turn
        whose audio is gone (it left the queue, or expired with it)."""
        raw = await self._client.get(self._keys.queued_audio(conversation_id, turn_id))
        return bytes(raw) if raw is not None else None

    # Running a conversation's queue.

    async def head(self, conversation_id: str) -> QueuedTurn | None:
        rows = await self._client.xrange(self._keys.queue(conversation_id), count=1)
        if not rows:
            return None
        entry_id, fields = rows[0]
        return _queued_turn(entry_id, fields)

    async def claim(self, conversation_id: str, turn: QueuedTurn, *, owner: str) -> Claim:
        keys = [self._keys.queue_state(conversation_id), self._keys.turn(conversation_id),
                self._keys.queue(conversation_id)]
        # A fresh id per call: redis-py's retries of this call resend it (see _CLAIM).
        args: ScriptArgs = [turn.turn_id, owner, self._max_attempts, self._ttl_ms,
                            turn.deadline_ms, uuid.uuid4().hex]
        return _claim_of(await self._claim(keys=keys, args=args))

    async def finish(self, conversation_id: str, turn: QueuedTurn, epoch: int) -> Finished:
        """Remove a turn that ended, with its clip and its input (unless another attempt runs
        it now)."""
        keys = [self._keys.queue(conversation_id), self._keys.queue_state(conversation_id),
                self._keys.turns_done(conversation_id),
                self._keys.queued_audio(conversation_id, turn.turn_id),
                self._keys.turn_input(conversation_id, turn.turn_id)]
        args: ScriptArgs = [turn.turn_id, epoch, turn.entry_id, self._ttl_ms]
        return Finished(int(await self._finish(keys=keys, args=args)))

    async def is_queued(self, conversation_id: str, turn_id: str) -> bool:
        """The turn is still queued or running (it has not left the queue)."""
        key = self._keys.queue_state(conversation_id)
        return bool(await answer(self._client.hexists(key, f"a:{turn_id}")))

    async def hand_back(self, conversation_id: str, turn_id: str, epoch: int) -> bool:
        """End this attempt unfinished without counting it (graceful stop): the next worker
        continues the turn."""
        keys = [self._keys.queue_state(conversation_id)]
        return bool(int(await self._step_back(keys=keys, args=[turn_id, epoch, ""])))

    async def record_failure(self, conversation_id: str, turn_id: str, epoch: int,
                             error: str) -> bool:
        """End this attempt as failed (it stays counted); the error goes to its dead letter."""
        keys = [self._keys.queue_state(conversation_id)]
        return bool(int(await self._step_back(keys=keys, args=[turn_id, epoch, error or "-"])))

    async def last_error(self, conversation_id: str, turn_id: str) -> str | None:
        key = self._keys.queue_state(conversation_id)
        raw = await answer(self._client.hget(key, f"err:{turn_id}"))
        return text(raw) if raw is not None else None

    async def still_running(self, conversation_id: str, turn_id: str, epoch: int) -> bool:
        """True while this attempt is the one allowed to run (not dropped, not taken over)."""
        raw = await answer(self._client.hget(self._keys.queue_state(conversation_id), RUN_FIELD))
        return raw is not None and text(raw) == run_value(turn_id, epoch)

    def run_guard(self, conversation_id: str, turn_id: str, epoch: int) -> Guard:
        """The condition under which this attempt may open its turn (``ConversationLog``)."""
        return Guard(self._keys.queue_state(conversation_id), RUN_FIELD, run_value(turn_id, epoch))

    def drop_queued(self, conversation_id: str) -> InterruptExtension:
        """Drop every queued turn of the conversation in the interrupt's own atomic step; the
        outcome's ``extra`` is (dropped turns,)."""
        keys = [self._keys.queue(conversation_id), self._keys.queue_state(conversation_id),
                self._keys.turns_done(conversation_id)]
        return InterruptExtension(self._interrupt_and_drop, keys,
                                  [self._ttl_ms, self._keys.queued_audio_prefix(conversation_id)])

    async def running_turn(self, conversation_id: str) -> str | None:
        """The turn whose attempt is allowed to run now, if any (for operators)."""
        raw = await answer(self._client.hget(self._keys.queue_state(conversation_id), RUN_FIELD))
        return text(raw).partition(RUN_SEPARATOR)[0] if raw is not None else None

    async def queued(self, conversation_id: str) -> list[QueuedTurn]:
        """Every queued turn of the conversation, oldest first (for operators)."""
        rows = await self._client.xrange(self._keys.queue(conversation_id))
        return [_queued_turn(entry_id, fields) for entry_id, fields in rows]

    async def attempts(self, conversation_id: str) -> dict[str, int]:
        """Attempts started per turn still in the queue (for operators)."""
        raw = await answer(self._client.hgetall(self._keys.queue_state(conversation_id)))
        fields = {text(k): text(v) for k, v in raw.items()}
        return {name[len(ATTEMPTS_PREFIX):]: int(value) for name, value in fields.items()
                if name.startswith(ATTEMPTS_PREFIX)}

    # The runner lease.

    async def take(self, conversation_id: str, *, owner: str, doorbell: str,
                   claim: bool = False) -> Take:
        """Try to become the conversation's runner, backed by ``doorbell``; when it does, the
        queue's head comes along (read in the same step), and with ``claim`` a taken (not taken
        over) head is claimed in that step too."""
        keys = [self._keys.queue_runner(conversation_id), self._keys.queue(conversation_id),
                self._keys.queue_state(conversation_id), self._keys.turn(conversation_id)]
        args: list[ScriptArg] = [owner, doorbell, self._lease_ms]
        if claim:  # a fresh id per call: redis-py's retries of this call resend it (see _CLAIM)
            args += [self._max_attempts, self._ttl_ms, uuid.uuid4().hex]
        reply = await self._take(keys=keys, args=args)
        kinds = {1: RunnerTake.TAKEN, 2: RunnerTake.TAKEN_OVER, 3: RunnerTake.MINE}
        head = claimed = None
        if len(reply) >= 4:
            flat = reply[3]
            head = _queued_turn(reply[2], dict(zip(flat[::2], flat[1::2], strict=True)))
        if len(reply) == 5:
            claimed = _claim_of(reply[4])
        return Take(kinds.get(int(reply[0]), RunnerTake.BUSY), text(reply[1]), head, claimed)

    async def renew(self, conversation_id: str, *, owner: str, doorbell: str) -> bool:
        keys = [self._keys.queue_runner(conversation_id)]
        return bool(int(await self._renew(keys=keys,
                                          args=[f"{owner}|{doorbell}", self._lease_ms])))

    async def release_if_empty(self, conversation_id: str, *, owner: str,
                               doorbell: str) -> Released:
        """Give up the runner lease if the queue is empty."""
        keys = [self._keys.queue_runner(conversation_id), self._keys.queue(conversation_id)]
        return Released(int(await self._release(keys=keys, args=[f"{owner}|{doorbell}"])))

    async def give_up(self, conversation_id: str, *, owner: str, doorbell: str) -> None:
        keys = [self._keys.queue_runner(conversation_id)]
        await self._give_up(keys=keys, args=[f"{owner}|{doorbell}"])

    async def runner(self, conversation_id: str) -> str | None:
        raw = await self._client.get(self._keys.queue_runner(conversation_id))
        return text(raw).rpartition("|")[0] if raw is not None else None
