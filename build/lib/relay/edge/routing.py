"""Which blocking read serves which conversation stream.

On a single server one shard reads every stream the edge watches in one multi-stream XREAD. On a
Redis Cluster a multi-key command must stay within one slot, so there is one shard per key
bucket (see ``relay.keys``): each reads that bucket's streams, on the node that owns the bucket's
slot, through a connection of its own. Either way the number of blocking reads (and of Redis
connections they hold) is fixed by configuration, never by the number of clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from relay.keys import Keys
from relay.redis_conn import RedisClient, node_client


class TopologyChanged(Exception):
    """The node layout changed (redirect, failover): re-discover it and regroup the streams."""


@dataclass(eq=False)
class Shard:
    name: str
    client: RedisClient  # a plain client of one server or one cluster node
    wake_key: str
    bucket: int | None  # None: every bucket

    @property
    def wake_key_bytes(self) -> bytes:
        return self.wake_key.encode()

    def covers(self, bucket: int) -> bool:
        return self.bucket is None or self.bucket == bucket


class Router(Protocol):
    async def refresh(self) -> list[Shard]: ...

    def shard_for(self, bucket: int, shards: list[Shard]) -> Shard | None: ...

    async def close(self) -> None: ...


class SingleRouter:
    """One server: every stream on the one shard, read through the given client."""

    def __init__(self, client: RedisClient, keys: Keys, node_id: str) -> None:
        self._shard = Shard("redis", client, keys.edge_wake(node_id), bucket=None)

    async def refresh(self) -> list[Shard]:
        return [self._shard]

    def shard_for(self, bucket: int, shards: list[Shard]) -> Shard | None:
        return shards[0] if shards else None

    async def close(self) -> None:
        await self._shard.client.aclose()


class ClusterRouter:
    """Redis Cluster: a shard per bucket, on the primary that owns the bucket's slot."""

    def __init__(self, cluster: RedisCluster, keys: Keys, node_id: str, *, block_ms: int) -> None:
        self._cluster = cluster
        self._keys = keys
        self._node_id = node_id
        self._block_ms = block_ms
        self._clients: list[redis.Redis] = []

    async def refresh(self) -> list[Shard]:
        await self.close()
        await self._cluster.nodes_manager.initialize()
        shards = []
        for bucket in range(self._keys.buckets):
            wake_key = self._keys.edge_wake(self._node_id, bucket)
            node = self._cluster.get_node_from_key(wake_key)
            if node is None:
                raise TopologyChanged(f"no node serves {wake_key}")
            client = node_client(node.host, int(node.port), block_ms=self._block_ms,
                                 like=self._cluster)
            self._clients.append(client)
            shards.append(Shard(f"{node.name}/b{bucket}", client, wake_key, bucket))
        return shards

    def shard_for(self, bucket: int, shards: list[Shard]) -> Shard | None:
        return shards[bucket] if bucket < len(shards) else None

    async def close(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()
