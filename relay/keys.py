"""The only module that names Redis keys.

Every per-conversation key carries the conversation's *bucket* as its hash tag
(``relay:{b7}:<conversation>:stream``): a conversation's stream, turn record and locks live in
one Redis Cluster slot and can be touched by one script. Conversations share a bucket by hash
(``crc32(id) % buckets``), so on a cluster an edge can read all streams of a bucket with one
connection subscribed to that bucket's live channels (a sharded pub/sub command must stay within
one slot): the number of Redis connections an edge needs for live delivery is the bucket count,
never the number of conversations. Keys shared
by the whole deployment (the job queue, the session cap) have tags of their own.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Protocol

from relay.errors import InvalidConversationId

# Braces are excluded because they would break the hash tag; the rest keeps ids safe in URLs,
# logs and key names alike. "." and ".." fit the alphabet but are path segments a browser (and
# any URL library) rewrites before sending, so a client could never ask for them.
_CONVERSATION_ID = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._:-]{1,128}$")
_TURN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _glob_escape(text: str) -> str:
    """Escape the characters Redis glob patterns treat specially (braces are literal there)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def validate_conversation_id(conversation_id: str) -> str:
    if not isinstance(conversation_id, str) or not _CONVERSATION_ID.match(conversation_id):
        raise InvalidConversationId(
            'conversation id must be 1-128 characters of A-Z a-z 0-9 . _ : -, not "." or ".."'
        )
    return conversation_id


def validate_turn_id(turn_id: str) -> str:
    if not isinstance(turn_id, str) or not _TURN_ID.match(turn_id):
        raise ValueError("turn id must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    return turn_id


DEFAULT_BUCKETS = 16

# Lua: live_channel_of(stream key) is ``Keys.live_channel`` of the stream's conversation, so the
# scripts that append (relay.streams) can push without a key of their own in every caller's key
# list. Kept in step with ``Keys.stream`` and ``Keys.live_channel`` by a test.
LIVE_CHANNEL_OF_STREAM = """
local function live_channel_of(stream)
  return string.sub(stream, 1, -7) .. 'live'
end
"""


class KeySettings(Protocol):
    """What ``Keys.of`` reads (``relay.settings.Settings`` has both)."""

    @property
    def key_prefix(self) -> str: ...

    @property
    def key_buckets(self) -> int: ...


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix, so several deployments (or test runs) can share a server.

    Every process of a deployment must use the same ``prefix`` and ``buckets``.
    """

    prefix: str = "relay"
    buckets: int = DEFAULT_BUCKETS

    @classmethod
    def of(cls, settings: KeySettings) -> Keys:
        """The keys of a deployment, from its settings (RELAY_KEY_PREFIX, RELAY_KEY_BUCKETS)."""
        return cls(settings.key_prefix, settings.key_buckets)

    def __post_init__(self) -> None:
        if not 1 <= self.buckets <= 16384:
            raise ValueError("buckets must be between 1 and 16384")

    def bucket(self, conversation_id: str) -> int:
        validate_conversation_id(conversation_id)
        return zlib.crc32(conversation_id.encode()) % self.buckets

    def _conv(self, conversation_id: str, suffix: str) -> str:
        return f"{self.prefix}:{{b{self.bucket(conversation_id)}}}:{conversation_id}:{suffix}"

    def stream(self, conversation_id: str) -> str:
        """The conversation's delivery stream: every message clients receive, in order."""
        return self._conv(conversation_id, "stream")

    def turn(self, conversation_id: str) -> str:
        """Hash describing the current turn: id, start entry, status, owner."""
        return self._conv(conversation_id, "turn")

    def conversation_lock(self, conversation_id: str) -> str:
        """Lease of the producer running this conversation's turns, so turns never interleave."""
        return self._conv(conversation_id, "lock")

    def turn_input(self, conversation_id: str, turn_id: str) -> str:
        """Audio chunks a caller feeds into a streamed turn while its TTS is still generating."""
        validate_turn_id(turn_id)
        return self._conv(conversation_id, f"input:{turn_id}")

    def control_channel(self, conversation_id: str) -> str:
        """Pub/sub channel that tells the producer running a turn to stop it at once."""
        return self._conv(conversation_id, "control")

    def control_pattern(self) -> str:
        """PSUBSCRIBE pattern matching every conversation's control channel under this prefix."""
        return f"{_glob_escape(self.prefix)}:{{b*}}:*:control"

    def conversation_of_control(self, channel: str) -> str | None:
        """The conversation id inside a control channel name, or None for any other name."""
        head, tail = f"{self.prefix}:{{b", ":control"
        if not (channel.startswith(head) and channel.endswith(tail)):
            return None
        _, sep, conversation_id = channel[len(head) : -len(tail)].partition("}:")
        if not sep or not _CONVERSATION_ID.match(conversation_id):
            return None
        return conversation_id if self.control_channel(conversation_id) == channel else None

    def live_channel(self, conversation_id: str) -> str:
        """Sharded pub/sub channel (SPUBLISH/SSUBSCRIBE) on which every append to the
        conversation's stream is also pushed to the edges serving it; it shares the stream's
        slot, so the append script can publish and a cluster sends it only to that shard."""
        return self._conv(conversation_id, "live")

    def bucket_tag_key(self, bucket: int) -> str:
        """A name in ``bucket``'s slot, to find the cluster node that owns the bucket."""
        return f"{self.prefix}:{{b{bucket}}}:slot"

    def jobs(self) -> str:
        """Stream of doorbells ("conversation X has queued turns") consumed by producer workers
        through a consumer group; the turns themselves wait in ``queue``."""
        return f"{self.prefix}:jobs"

    def jobs_group(self) -> str:
        return "producers"

    # The two session-cap keys share the ``{sdk}`` hash tag: one script updates both.

    def sdk_sessions(self) -> str:
        """Live Motion Server session leases of all producers (member -> expiry in ms)."""
        return f"{self.prefix}:{{sdk}}:sessions"

    def producer_alive(self, owner: str) -> str:
        """Pub/sub channel a producer process stays subscribed to for as long as it lives: the
        session-lease scripts tell a crashed producer (no subscriber: its connections closed
        with it) from one that may only be paused."""
        return f"{self.prefix}:producer:{owner}:alive"

    def sdk_session_cap(self) -> str:
        """The session cap the producers run with (their ``RELAY_MAX_SDK_SESSIONS``), which each
        producer publishes with an expiry: a submit that opens its turn at once checks it."""
        return f"{self.prefix}:{{sdk}}:cap"

    def sdk_kept(self) -> str:
        """Hash: conversation id -> the lease id of the Motion Server session a producer keeps
        for it (a submit that opens its turn at once may, at the cap, count on that session)."""
        return f"{self.prefix}:{{sdk}}:kept"

    def sdk_waiters(self) -> str:
        """Sorted set of turns waiting for a session slot (member -> expiry in ms): the demand
        that makes producers close their idle sessions early."""
        return f"{self.prefix}:{{sdk}}:waiters"

    # The job queue (workers/jobstore.py). A conversation's queued turns live in its own slot, so
    # one script can claim, fence and finish a turn together with the turn record.

    def queue(self, conversation_id: str) -> str:
        """Stream of this conversation's queued turn jobs, oldest first: its FIFO."""
        return self._conv(conversation_id, "queue")

    def queued_audio(self, conversation_id: str, turn_id: str) -> str:
        """The PCM of a queued clip turn, beside its queue entry rather than in it: the queue's
        scripts then never carry the clip (a script pays for every byte passing through Lua; a
        plain SET or GET of the same bytes costs Redis a tenth of that)."""
        return self.queued_audio_prefix(conversation_id) + validate_turn_id(turn_id)

    def queued_audio_prefix(self, conversation_id: str) -> str:
        """``queued_audio`` without its turn id (``queued_audio`` is built from it, so the two
        agree): a script that drops queued turns names their audio keys from it (each in the
        conversation's slot)."""
        return self._conv(conversation_id, "qaudio:")

    def queued_audio_upload(self, conversation_id: str, nonce: str) -> str:
        """Where one submit call puts its clip before the submit script decides (``nonce`` is
        unique per call): the script renames it to ``queued_audio`` when it queues the turn and
        deletes it otherwise, so a clip becomes a turn's only through the call that queued it."""
        if not nonce.isascii() or not nonce.isalnum():
            raise ValueError("nonce must be ASCII letters and digits")
        return self._conv(conversation_id, f"qupload:{nonce}")

    def queue_state(self, conversation_id: str) -> str:
        """Hash of the queue's bookkeeping: attempts per queued turn, the epoch counter, and the
        attempt allowed to run now."""
        return self._conv(conversation_id, "qstate")

    def turns_done(self, conversation_id: str) -> str:
        """Sorted set of turn ids that left the queue (played, dead, dropped) -> when: a job
        delivered again by another queue system must not play its turn twice."""
        return self._conv(conversation_id, "done")

    def queue_runner(self, conversation_id: str) -> str:
        """Lease of the worker running this conversation's queue, with the doorbell backing it."""
        return self._conv(conversation_id, "runner")

    def dead_letters(self) -> str:
        """Stream of turns that will not be played: attempts used up, deadline passed, malformed."""
        return f"{self.prefix}:jobs:dead"

    def dead_letters_index(self) -> str:
        """Sorted set of the turns already dead-lettered (``<conversation>/<turn>``), so a turn is
        buried once. Its hash tag is the dead letters' whole key name, which puts it in their
        slot: one script writes both."""
        return f"{{{self.dead_letters()}}}:index"
