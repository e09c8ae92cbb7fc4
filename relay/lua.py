"""What every Lua script of the relay shares: the server-clock prelude, registration, replies.

Scripts live with the module that owns the record they write (``relay.streams``,
``workers.queue.records``, ``workers.speech.leases``, ...); this module only holds the pieces they
would otherwise each repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias, cast

from redis.commands.core import AsyncScript

from relay.redis_conn import RedisClient

# Sets ``now`` to the Redis server's clock in unix milliseconds. Every expiry decision is made on
# that one clock, so processes whose own clocks are skewed still agree.
NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Lua: take_lock(key, owner, px, previous) sets ``key`` to ``owner`` for ``px`` ms when it is free,
# already the caller's, or held by ``previous`` (a holder the caller may take over; '' for none);
# returns false and the holder otherwise. The producers' conversation lock
# (``workers.speech.leases``) uses it alone and inside a turn's opening (``relay.streams``).
# Run twice: the second run finds the caller's own value and sets it again (a renewal).
TAKE_LOCK = """
local function take_lock(key, owner, px, previous)
  local v = redis.call('GET', key)
  if v and v ~= owner and v ~= previous then return false, v end
  redis.call('SET', key, owner, 'PX', px)
  return true, owner
end
"""

ScriptArg: TypeAlias = bytes | str | int | float
ScriptArgs: TypeAlias = Sequence[ScriptArg]


def register(client: RedisClient, source: str) -> AsyncScript:
    """``register_script`` for either client kind (redis-py types it for ``Redis`` only, though
    ``RedisCluster`` has the same method and runs the script on the keys' node)."""
    return cast(AsyncScript, cast(Any, client).register_script(source))


def text(value: Any) -> str:
    """A reply element (bytes from a client without decode_responses) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
