"""All settings, read from the environment once at the edge of the program (docs/operations.md)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from relay.errors import ConfigError

MIN_SECRET_LEN = 16
SAMPLE_RATES = frozenset({8000, 16000, 22050, 24000, 32000, 44100, 48000})


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    # Redis. Empty means "start an embedded server" where the command allows it.
    redis_url: str = field(default="", repr=False)
    redis_cluster: bool = False  # REDIS_URL names one node of a Redis Cluster
    redis_pool_size: int = 32  # connections per process (per node on a cluster) for commands
    key_prefix: str = "relay"
    key_buckets: int = 16  # conversations per hash-tag bucket; the same on every process

    # Retention of conversation streams: length cap (approximate trim) and idle expiry.
    stream_maxlen: int = 10_000
    stream_ttl_s: int = 3600

    # Client tokens.
    token_secret: str = field(default="", repr=False)
    token_ttl_s: int = 3600

    # Edge.
    edge_host: str = "127.0.0.1"
    edge_port: int = 8080
    node_id: str = field(default_factory=_default_node_id)
    read_block_ms: int = 1000
    read_count: int = 512
    client_queue_messages: int = 4096
    client_queue_bytes: int = 16 * 1024 * 1024
    client_message_max_bytes: int = 4096
    send_timeout_s: float = 10.0
    heartbeat_s: float = 20.0
    redis_unavailable_s: float = 10.0  # Redis gone this long: clients get 4503 and move on
    drain_delay_s: float = 0.0  # after SIGTERM: /readyz says 503 this long before clients go
    drain_timeout_s: float = 10.0  # then clients get 1012 and have this long to leave
    # Live path by push (issue 11): read_block_ms is the subscriber connection's keepalive, and
    # read_count the page of a history read. A gap longer than this is not filled by the edge:
    # its clients get 4429 edge_behind and resume through history.
    live_fill_max_entries: int = 16_384

    # Producer and the Spatius Server SDK.
    spatius_api_key: str = field(default="", repr=False)
    spatius_app_id: str = ""
    spatius_avatar_id: str = ""
    spatius_region: str = "auto"
    spatius_console_url: str = ""
    spatius_ingress_url: str = ""
    sample_rate: int = 16000
    chunk_ms: int = 40
    producer_concurrency: int = 32
    session_idle_s: float = 20.0
    per_turn_sessions: bool = False
    max_sdk_sessions: int = 8
    sdk_lease_s: float = 15.0
    sdk_wait_s: float = 30.0
    frames_timeout_s: float = 10.0
    conversation_lease_s: float = 15.0
    conversation_wait_s: float = 60.0  # longest a turn waits for another producer's turn to end
    jobs_block_ms: int = 1000
    producer_health_host: str = "127.0.0.1"
    producer_health_port: int = 8090  # /healthz and /readyz of `relay producer`; 0 = off
    turn_input_timeout_s: float = 30.0  # a queued streamed turn ends after this long without input
    turn_input_ttl_s: int = 600  # expiry of a queued streamed turn's input stream
    # Job queue: crash recovery, poison turns, graceful stop (docs/operations.md "Job queue").
    job_claim_idle_s: float = 10.0  # a turn job unrenewed this long is taken over by another worker
    job_max_attempts: int = 3  # attempts of a turn before it goes to the dead letters
    job_ttl_s: int = 86_400  # a conversation's queue expires this long after its last change
    conversation_queue_max: int = 64  # queued turns one conversation may hold (QueueFull beyond)
    dead_letter_maxlen: int = 1000  # dead letters kept (approximate trim); each holds its audio
    interrupt_drops_queued: bool = True  # TurnQueue.interrupt also drops turns queued before it
    producer_stop_s: float = 20.0  # on SIGTERM, running turns get this long before hand-back

    # Motion Server simulator (`relay motion-sim`).
    sim_host: str = "127.0.0.1"
    sim_port: int = 8300
    sim_max_sessions: int = 40  # the largest Spatius plan's cap; 0 = unlimited
    sim_batch_keyframes: int = 5  # 200 ms of animation per message, as in streaming mode
    sim_realtime: bool = False

    # Logs.
    log_json: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check_positive(self, ["job_claim_idle_s", "job_max_attempts", "job_ttl_s",
                               "conversation_queue_max", "dead_letter_maxlen", "producer_stop_s"])
        _check_positive(self, ["stream_maxlen", "stream_ttl_s", "token_ttl_s", "read_count",
                               "client_queue_messages", "client_queue_bytes", "chunk_ms",
                               "producer_concurrency", "max_sdk_sessions", "read_block_ms",
                               "client_message_max_bytes", "jobs_block_ms", "redis_pool_size",
                               "key_buckets", "live_fill_max_entries",
                               "conversation_wait_s", "turn_input_timeout_s", "turn_input_ttl_s"])
        if self.sample_rate not in SAMPLE_RATES:
            raise ConfigError(f"RELAY_SAMPLE_RATE must be one of {sorted(SAMPLE_RATES)}")
        if self.token_secret and len(self.token_secret) < MIN_SECRET_LEN:
            raise ConfigError(f"RELAY_TOKEN_SECRET must be at least {MIN_SECRET_LEN} characters")
        if not self.key_prefix or "{" in self.key_prefix or "}" in self.key_prefix:
            raise ConfigError("RELAY_KEY_PREFIX must be non-empty and contain no braces")
        if not self.node_id or "{" in self.node_id or "}" in self.node_id:
            raise ConfigError("RELAY_NODE_ID must be non-empty and contain no braces")

    @property
    def uses_real_motion_server(self) -> bool:
        """True when Spatius credentials are set; otherwise producers talk to the simulator."""
        return bool(self.spatius_api_key and self.spatius_app_id)

    def require_secret(self) -> str:
        if not self.token_secret:
            raise ConfigError("RELAY_TOKEN_SECRET is not set")
        return self.token_secret

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError("REDIS_URL is not set")
        return self.redis_url

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = _ENV_NAMES.get(f.name, f"RELAY_{f.name.upper()}")
            raw = source.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(name, raw, f.type)
        return cls(**values)


# Settings whose variable is not simply RELAY_<FIELD>.
_ENV_NAMES = {
    "redis_url": "REDIS_URL",
    "spatius_api_key": "SPATIUS_API_KEY",
    "spatius_app_id": "SPATIUS_APP_ID",
    "spatius_avatar_id": "SPATIUS_AVATAR_ID",
    "spatius_region": "SPATIUS_REGION",
    "spatius_console_url": "SPATIUS_CONSOLE_URL",
    "spatius_ingress_url": "SPATIUS_INGRESS_URL",
}


def env_name(field_name: str) -> str:
    return _ENV_NAMES.get(field_name, f"RELAY_{field_name.upper()}")


def _coerce(name: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind == "bool":
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from exc
    return raw


def _check_positive(settings: Settings, names: list[str]) -> None:
    for name in names:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{env_name(name)} must be positive")
