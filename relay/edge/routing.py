"""Which Redis node serves which conversation stream, for the hub's per-node blocking reads.

On a single server there is one shard. On a Redis Cluster there is one shard per primary; a
stream belongs to the primary that owns its slot. Each shard has its own small client (a blocking
read occupies a connection) and a wake stream whose key hashes to a slot on that same node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from relay.keys import Keys
from relay.redis_conn import node_client

SLOTS = 16384


class TopologyChanged(Exception):
    """The node layout changed (redirect, failover): re-discover it and regroup the streams."""


@dataclass(eq=False)
class Shard:
    name: str
    client: redis.Redis
    wake_key: str

    @property
    def wake_key_bytes(self) -> bytes:
        return self.wake_key.encode()


class Router(Protocol):
    async def refresh(self) -> list[Shard]: ...

    def slot_of(self, key: str) -> int: ...

    def shard_of(self, key: str, shards: list[Shard]) -> Shard | None: ...

    async def close(self) -> None: ...


class SingleRouter:
    """One server: every stream on the one shard, read through the given client."""

    def __init__(self, client: redis.Redis, keys: Keys, node_id: str) -> None:
        self._shard = Shard("redis", client, keys.edge_wake(node_id))

    async def refresh(self) -> list[Shard]:
        return [self._shard]

    def slot_of(self, key: str) -> int:
        return 0

    def shard_of(self, key: str, shards: list[Shard]) -> Shard | None:
        return shards[0] if shards else None

    async def close(self) -> None:
        await self._shard.client.aclose()


class ClusterRouter:
    """Redis Cluster: a shard per primary, found from the cluster client's slot table."""

    def __init__(self, cluster: RedisCluster, keys: Keys, node_id: str, *, block_ms: int) -> None:
        self._cluster = cluster
        self._keys = keys
        self._node_id = node_id
        self._block_ms = block_ms
        self._clients: dict[str, redis.Redis] = {}
        self._slot_owner: list[str] = []

    async def refresh(self) -> list[Shard]:
        await self._cluster.initialize()
        manager = self._cluster.nodes_manager
        await manager.initialize()
        owners = []
        for slot in range(SLOTS):
            owners.append(manager.get_node_from_slot(slot).name)
        self._slot_owner = owners
        shards = []
        for node in self._cluster.get_primaries():
            client = self._clients.get(node.name)
            if client is None:
                client = node_client(node.host, node.port, block_ms=self._block_ms,
                                     like=self._cluster)
                self._clients[node.name] = client
            shards.append(Shard(node.name, client, self._wake_key_on(node.name)))
        return shards

    def _wake_key_on(self, node_name: str) -> str:
        """A wake key whose hash tag puts it on ``node_name``."""
        for index in range(SLOTS * 4):
            key = self._keys.edge_wake(self._node_id, tag=str(index))
            if self._slot_owner[key_slot(key.encode())] == node_name:
                return key
        raise TopologyChanged(f"no slot found on {node_name}")

    def slot_of(self, key: str) -> int:
        return key_slot(key.encode())

    def shard_of(self, key: str, shards: list[Shard]) -> Shard | None:
        if not self._slot_owner:
            return None
        owner = self._slot_owner[key_slot(key.encode())]
        for shard in shards:  # a handful of primaries; a dict would not pay for itself
            if shard.name == owner:
                return shard
        return None

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
