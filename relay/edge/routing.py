"""Which subscriber connection serves which conversation's live channel.

On a single server one shard subscribes to every live channel the edge watches. On a Redis
Cluster a sharded pub/sub command must stay within one slot, so there is one shard per key
bucket (see ``relay.keys``): each subscribes to that bucket's channels, on the node that owns the
bucket's slot, through a connection of its own. Either way the number of subscriber connections
is fixed by configuration, never by the number of clients or conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from relay.keys import Keys
from relay.redis_conn import node_client


class TopologyChanged(Exception):
    """The node layout changed (redirect, failover): re-discover it and regroup the streams."""


@dataclass(eq=False)
class Shard:
    name: str
    client: redis.Redis  # its address and credentials make the shard's subscriber connection
    bucket: int | None  # None: every bucket

    def covers(self, bucket: int) -> bool:
        return self.bucket is None or self.bucket == bucket


class Router(Protocol):
    async def refresh(self) -> list[Shard]: ...

    def shard_for(self, bucket: int, shards: list[Shard]) -> Shard | None: ...

    async def close(self) -> None: ...


class SingleRouter:
    """One server: every stream on the one shard, read through the given client."""

    def __init__(self, client: redis.Redis) -> None:
        self._shard = Shard("redis", client, bucket=None)

    async def refresh(self) -> list[Shard]:
        return [self._shard]

    def shard_for(self, bucket: int, shards: list[Shard]) -> Shard | None:
        return shards[0] if shards else None

    async def close(self) -> None:
        await self._shard.client.aclose()


class ClusterRouter:
    """Redis Cluster: a shard per bucket, on the primary that owns the bucket's slot."""

    def __init__(self, cluster: RedisCluster, keys: Keys, *, block_ms: int) -> None:
        self._cluster = cluster
        self._keys = keys
        self._block_ms = block_ms
        self._clients: list[redis.Redis] = []

    async def refresh(self) -> list[Shard]:
        await self.close()
        await self._cluster.nodes_manager.initialize()
        shards = []
        for bucket in range(self._keys.buckets):
            key = self._keys.bucket_tag_key(bucket)
            node = self._cluster.get_node_from_key(key)
            if node is None:
                raise TopologyChanged(f"no node serves {key}")
            client = node_client(node.host, int(node.port), block_ms=self._block_ms,
                                 like=self._cluster)
            self._clients.append(client)
            shards.append(Shard(f"{node.name}/b{bucket}", client, bucket))
        return shards

    def shard_for(self, bucket: int, shards: list[Shard]) -> Shard | None:
        return shards[bucket] if bucket < len(shards) else None

    async def close(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()
