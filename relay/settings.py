"""All settings, read from the environment once at the edge of the program (docs/operations.md).

Each setting is declared with the values it accepts, next to its default::

    heartbeat_s: float = setting(20.0, number(gt=0, le=HOUR))

``Settings`` checks every field against its rule when it is built (from the environment or in
code), so a bad value stops the process at start-up with ``NAME=value: why`` instead of failing
later. The rule's ``doc`` is the range that docs/operations.md shows for the variable, and the
test suite checks that every field has a rule and that the docs show it.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from relay.errors import ConfigError

# RFC 7518 section 3.2: an HS256 key is at least as long as the hash (32 bytes).
MIN_SECRET_LEN = 32
SAMPLE_RATES = frozenset({8000, 16000, 22050, 24000, 32000, 44100, 48000})
LOG_LEVELS = ("debug", "info", "warning", "error")
MINUTE = 60
HOUR = 3600
DAY = 86_400
WEEK = 7 * DAY

_T = TypeVar("_T")


class SettingError(ConfigError):
    """One setting refused: ``str()`` is ``NAME=value: why``, the value hidden for secrets."""

    def __init__(self, name: str, shown: str, why: str) -> None:
        super().__init__(f"{name}={shown}: {why}")
        self.name, self.shown, self.why = name, shown, why


@dataclass(frozen=True)
class Rule:
    """The values one setting accepts. ``refuse`` returns why a value is wrong, or None."""

    doc: str  # the range as docs/operations.md shows it
    refuse: Callable[[Any], str | None]
    secret: bool = False  # never echo the value in an error


def setting(default: _T, rule: Rule, *, repr: bool = True) -> _T:
    """A settings field: its default and the rule every value must pass. ``repr=False`` keeps a
    value that may hold a password (a URL) out of ``repr(settings)``; secrets never show."""
    return field(default=default, repr=repr and not rule.secret, metadata={"rule": rule})


def setting_factory(factory: Callable[[], _T], rule: Rule) -> _T:
    return field(default_factory=factory, repr=not rule.secret, metadata={"rule": rule})


# --- rules ---------------------------------------------------------------------------------------

def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _span(low: float, high: float | None, *, open_low: bool = False) -> str:
    if high is None:
        return f"{'>' if open_low else '>='} {_num(low)}"
    if open_low:
        return f"> {_num(low)} and <= {_num(high)}"
    return f"{_num(low)} to {_num(high)}"


def integer(low: int, high: int | None = None, *, zero: str = "") -> Rule:
    """A whole number in [low, high]; ``zero`` documents a special meaning of 0 below low."""
    doc = _span(low, high) + (f", or 0 ({zero})" if zero else "")

    def refuse(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "not an integer"
        if value == 0 and zero:
            return None
        if value < low or (high is not None and value > high):
            return f"must be {doc}"
        return None

    return Rule(doc, refuse)


def number(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Rule:
    """A finite number (seconds, usually) above gt or from ge, up to le."""
    low = gt if gt is not None else ge
    doc = _span(low if low is not None else -math.inf, le, open_low=gt is not None)

    def refuse(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "not a number"
        if not math.isfinite(value):
            return "must be a finite number"
        if (gt is not None and value <= gt) or (ge is not None and value < ge) or (
                le is not None and value > le):
            return f"must be {doc}"
        return None

    return Rule(doc, refuse)


def port(zero: str = "") -> Rule:
    return integer(1, 65535, zero=zero)


def one_of(*choices: object) -> Rule:
    doc = ", ".join(str(c) for c in choices)
    allowed = set(choices)

    def refuse(value: Any) -> str | None:
        same_type = type(value) is type(choices[0])
        return None if same_type and value in allowed else f"must be one of {doc}"

    return Rule(f"one of {doc}", refuse)


def flag() -> Rule:
    def refuse(value: Any) -> str | None:
        return None if isinstance(value, bool) else "must be true or false"

    return Rule("true or false", refuse)


def text(doc: str, check: Callable[[str], str | None] | None = None, *,
         secret: bool = False) -> Rule:
    def refuse(value: Any) -> str | None:
        if not isinstance(value, str):
            return "not text"
        return check(value) if check else None

    return Rule(doc, refuse, secret=secret)


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _no_braces(value: str) -> str | None:
    if not value:
        return "must not be empty"
    return "must not contain braces (they would break the hash tags)" if re.search(
        r"[{}]", value) else None


def _secret(value: str) -> str | None:
    if value and len(value) < MIN_SECRET_LEN:
        return f"must be at least {MIN_SECRET_LEN} characters"
    return None


def _origins(value: str) -> str | None:
    for origin in (normalise_origin(o) for o in value.split(",") if o.strip()):
        if not origin.startswith(("http://", "https://")) or "/" in origin.split("://", 1)[1]:
            return f"{origin!r} is not an origin like https://app.example.com"
    return None


def _redis_url(value: str) -> str | None:
    if not value:
        return None
    # redis-py's own parser, so what passes here is exactly what the client will accept; it also
    # reads the port, which refuses anything above 65535.
    from redis.connection import parse_url

    try:
        parse_url(value)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        return str(exc)
    return None


def _telemetry(value: str) -> str | None:
    if value in ("on", "off"):
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        return "must be on, off, or an http(s):// URL without a query"
    return None


def _http_or_ws_url(value: str) -> str | None:
    if not value:
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - reading it checks the port's range
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        return "must be an http(s):// or ws(s):// URL with a host"
    return None


def _shown(name: str, value: object, rule: Rule) -> str:
    """The value as an error message may print it: secrets hidden, a URL without its password."""
    if rule.secret:
        return f"<hidden, {len(str(value))} characters>"
    shown = str(value)
    if name == "REDIS_URL":
        shown = re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", shown)
    return shown


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


MONTH = 30 * DAY
ANY = text("any text")
HOST = text("a host name or address", _non_empty)
SECONDS = number(gt=0, le=HOUR)  # a timeout or interval: positive, finite, at most an hour
BLOCK_MS = integer(1, MINUTE * 1000)  # a blocking read's wait: at most a minute (socket timeouts)


@dataclass(frozen=True)
class Settings:
    # Redis. Empty means "start an embedded server" where the command allows it.
    redis_url: str = setting("", text("a redis://, rediss:// or unix:// URL", _redis_url),
                             repr=False)
    redis_cluster: bool = setting(False, flag())  # REDIS_URL names one node of a Redis Cluster
    # Connections per process (per node on a cluster) for commands.
    redis_pool_size: int = setting(32, integer(1, 10_000))
    key_prefix: str = setting("relay", text("non-empty, no braces", _no_braces))
    # Conversations per hash-tag bucket; the same on every process. At most one per cluster slot.
    key_buckets: int = setting(16, integer(1, 16_384))

    # Retention of conversation streams: length cap (approximate trim) and idle expiry.
    stream_maxlen: int = setting(10_000, integer(1, 100_000_000))
    stream_ttl_s: int = setting(3600, integer(1, MONTH))

    # Client tokens.
    token_secret: str = setting("", text(f"at least {MIN_SECRET_LEN} characters", _secret,
                                         secret=True))
    token_ttl_s: int = setting(3600, integer(1, WEEK))  # relay.tokens.MAX_TTL_S

    # Edge.
    edge_host: str = setting("127.0.0.1", HOST)
    edge_port: int = setting(8080, port(zero="any free port"))
    node_id: str = setting_factory(_default_node_id, text("non-empty, no braces", _no_braces))
    read_block_ms: int = setting(1000, BLOCK_MS)
    read_count: int = setting(512, integer(1, 100_000))
    client_queue_messages: int = setting(4096, integer(1, 1_000_000))
    client_queue_bytes: int = setting(16 * 1024 * 1024, integer(1, 1 << 30))
    client_message_max_bytes: int = setting(4096, integer(1, 1 << 20))
    send_timeout_s: float = setting(10.0, SECONDS)
    heartbeat_s: float = setting(20.0, SECONDS)
    # Redis gone this long: clients get 4503 and move on.
    redis_unavailable_s: float = setting(10.0, SECONDS)
    # After SIGTERM: /readyz says 503 this long before clients go...
    drain_delay_s: float = setting(0.0, number(ge=0, le=HOUR))
    # ...then clients get 1012 and have this long to leave.
    drain_timeout_s: float = setting(10.0, number(ge=0, le=HOUR))
    # Live path by push (issue 11): read_block_ms is the subscriber connection's keepalive, and
    # read_count the page of a history read. A gap longer than this is not filled by the edge:
    # its clients get 4429 edge_behind and resume through history.
    live_fill_max_entries: int = setting(16_384, integer(256, 10_000_000))

    # Producer and the Spatius Server SDK.
    spatius_api_key: str = setting("", text("any text", secret=True))
    spatius_app_id: str = setting("", ANY)
    spatius_avatar_id: str = setting("", ANY)
    spatius_region: str = setting("auto", text("a region name", _non_empty))
    spatius_console_url: str = setting("", text("an http(s):// or ws(s):// URL", _http_or_ws_url))
    spatius_ingress_url: str = setting("", text("an http(s):// or ws(s):// URL", _http_or_ws_url))
    sample_rate: int = setting(16000, one_of(*sorted(SAMPLE_RATES)))
    chunk_ms: int = setting(40, integer(1, 1000))
    producer_concurrency: int = setting(32, integer(1, 10_000))
    session_idle_s: float = setting(20.0, number(gt=0, le=DAY))
    per_turn_sessions: bool = setting(False, flag())
    max_sdk_sessions: int = setting(8, integer(1, 10_000))
    sdk_lease_s: float = setting(15.0, SECONDS)
    sdk_wait_s: float = setting(30.0, number(ge=0, le=HOUR))
    frames_timeout_s: float = setting(10.0, SECONDS)
    conversation_lease_s: float = setting(15.0, SECONDS)
    # Longest a turn waits for another producer's turn to end.
    conversation_wait_s: float = setting(60.0, number(gt=0, le=DAY))
    jobs_block_ms: int = setting(1000, BLOCK_MS)
    producer_health_host: str = setting("127.0.0.1", HOST)
    # /healthz and /readyz of `relay producer`; 0 = off.
    producer_health_port: int = setting(8090, port(zero="off"))
    # A queued streamed turn ends after this long without input.
    turn_input_timeout_s: float = setting(30.0, number(gt=0, le=DAY))
    # Expiry of a queued streamed turn's input stream.
    turn_input_ttl_s: int = setting(600, integer(1, MONTH))
    # Job queue: crash recovery, poison turns, graceful stop (docs/operations.md "Job queue").
    # A turn job unrenewed this long is taken over by another worker.
    job_claim_idle_s: float = setting(10.0, SECONDS)
    # Attempts of a turn before it goes to the dead letters.
    job_max_attempts: int = setting(3, integer(1, 100))
    # A conversation's queue expires this long after its last change.
    job_ttl_s: int = setting(86_400, integer(1, MONTH))
    # Queued turns one conversation may hold (QueueFull beyond).
    conversation_queue_max: int = setting(64, integer(1, 100_000))
    # Dead letters kept (approximate trim); each holds its audio.
    dead_letter_maxlen: int = setting(1000, integer(1, 10_000_000))
    # TurnQueue.interrupt also drops turns queued before it.
    interrupt_drops_queued: bool = setting(True, flag())
    # TurnQueue opens a clip turn of an idle conversation in its submit (first audio at once).
    queue_open_at_submit: bool = setting(True, flag())
    # On SIGTERM, running turns get this long before hand-back.
    producer_stop_s: float = setting(20.0, SECONDS)

    # Motion Server simulator (`relay motion-sim`).
    sim_host: str = setting("127.0.0.1", HOST)
    sim_port: int = setting(8300, port(zero="any free port"))
    # The largest Spatius plan's cap; 0 = unlimited.
    sim_max_sessions: int = setting(40, integer(1, 100_000, zero="unlimited"))
    # 5 = 200 ms of animation per message, as in streaming mode.
    sim_batch_keyframes: int = setting(5, integer(1, 1000))
    sim_realtime: bool = setting(False, flag())
    # Latency measurements (issue 12, `relay bench --latency`): a slower simulated Motion Server.
    # Each request's first animation message waits this long after its first audio.
    sim_first_batch_delay_ms: int = setting(0, integer(0, 60_000))
    # The session handshake is answered after this long.
    sim_handshake_delay_ms: int = setting(0, integer(0, 60_000))
    # Session tokens fetched ahead, each for one new SDK session (issue 12, workers/speech/tokens).
    sdk_token_stock: int = setting(2, integer(1, 64, zero="off"))

    # Who may connect: token keys, Origin allow-list, request hygiene and connection caps
    # (issue 13; docs/operations.md "Client tokens" and "Edge admission").
    # Key id of RELAY_TOKEN_SECRET; tokens without a kid are checked against this key.
    token_kid: str = setting("default", text("non-empty", _non_empty))
    # JWK Set of further keys (rotation, public keys); re-read when it changes.
    token_keys_file: str = setting("", text("a file path"))
    # Transition: also accept pre-JWT v1 tokens (checked with RELAY_TOKEN_SECRET).
    token_accept_v1: bool = setting(True, flag())
    token_audience: str = setting("", ANY)  # when set, tokens must carry this aud
    token_issuer: str = setting("", ANY)  # when set, tokens must carry this iss
    token_leeway_s: int = setting(30, integer(0, 300))  # clock skew on exp, iat and nbf
    # Comma-separated browser origins; empty: the Origin header is not checked.
    edge_allowed_origins: str = setting("", text("comma-separated origins", _origins))
    # A request head must be complete this soon after the connection opens.
    edge_handshake_timeout_s: float = setting(10.0, number(ge=0.1, le=300))
    # Bytes of "GET /path?query HTTP/1.1" and of any one header line; longer: HTTP 400.
    edge_max_request_line: int = setting(8190, integer(1024, 65536))
    edge_max_header_bytes: int = setting(8190, integer(1024, 65536))
    # Open WebSockets per client address, and per conversation, on one edge.
    edge_max_per_address: int = setting(256, integer(1, 1_000_000, zero="no cap"))
    edge_max_per_conversation: int = setting(64, integer(1, 1_000_000, zero="no cap"))
    # New WebSockets one edge takes per second (a burst of one second's worth): a reconnect
    # storm (a peer edge drained, a network blip) is spread out instead of starving the clients
    # already served. 0: no limit.
    edge_admit_rate: int = setting(0, integer(1, 1_000_000, zero="no limit"))

    # Operators can see it (issue 10; docs/operations.md "Spatius SDK telemetry"). The Spatius
    # SDK's own OTLP metrics and traces about its sessions: "on" sends them to Spatius (the SDK's
    # default), "off" sends nothing, a URL sends them to that OTLP/HTTP collector instead. Sessions
    # with the simulator never report anything.
    spatius_sdk_telemetry: str = setting("on", text("on, off, or an http(s):// URL", _telemetry))

    # Web demo page (issue 14): the edge also serves the demo page and the web client at /demo/.
    # Off in production; `relay run` turns it on for its edges.
    web_demo: bool = setting(False, flag())

    # Recovery from faults (issue 16; docs/operations.md "Slow clients", "Session cap").
    # What one client's socket may hold written but unread: the kernel send buffer (SO_SNDBUF)
    # and the transport's high-water mark each get this much, so a slow client reaches its
    # 4429 close within seconds instead of a heartbeat timeout with no close frame.
    client_send_buffer_bytes: int = setting(32 * 1024, integer(4096, 64 * 1024 * 1024))
    # A producer that stops renewing its session leases while it is still connected to Redis
    # may be paused with its Motion Server sessions open: its slots stay counted this long past
    # their expiry, the Motion Server's bound for dropping a peer that went silent (the
    # simulator drops a session after 60 s without audio).
    sdk_paused_hold_s: float = setting(60.0, number(ge=0, le=HOUR))

    # Logs.
    log_json: bool = setting(True, flag())
    log_level: str = setting("info", one_of(*LOG_LEVELS))

    def __post_init__(self) -> None:
        for f in fields(self):
            rule = rule_of(f.name)
            value = getattr(self, f.name)
            why = rule.refuse(value)
            if why:
                name = env_name(f.name)
                raise SettingError(name, _shown(name, value, rule), why)

    @property
    def allowed_origins(self) -> frozenset[str]:
        """RELAY_EDGE_ALLOWED_ORIGINS as normalised origins (``scheme://host[:port]``)."""
        return frozenset(normalise_origin(o) for o in self.edge_allowed_origins.split(",")
                         if o.strip())

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
        """Settings from the environment; a refused value is reported as it was written."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            raw = source.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(name, raw, f.type, rule_of(f.name))
        try:
            return cls(**values)
        except SettingError as exc:
            raw = source.get(exc.name)
            if raw is None:
                raise
            rule = rule_of(next(f.name for f in fields(cls) if env_name(f.name) == exc.name))
            raise SettingError(exc.name, _shown(exc.name, raw, rule), exc.why) from None


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


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """One line per ``RELAY_*`` variable that names no setting: a typo would otherwise be
    ignored without a word (``RELAY_HEARTBEAT=5`` leaves the 20 s default). Each names the
    closest setting when one is close. ``RELAY_TEST_*`` belongs to the test suite."""
    import difflib

    known = [env_name(f.name) for f in fields(Settings)]
    lines = []
    for name in sorted(env):
        if not name.startswith("RELAY_") or name in known or name.startswith("RELAY_TEST_"):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name} is not a setting{hint}; it is ignored")
    return lines


def rule_of(field_name: str) -> Rule:
    """The rule a field was declared with; a field declared without one is a bug, caught here."""
    rule = _FIELDS[field_name].metadata.get("rule")
    if not isinstance(rule, Rule):
        raise TypeError(f"setting {field_name} has no range: declare it with setting(...)")
    return rule


_FIELDS = {f.name: f for f in fields(Settings)}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, raw: str, kind: Any, rule: Rule) -> Any:
    """The text of an environment variable as the field's type; SettingError if it is not one."""
    kind = str(kind)
    if kind == "bool":
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise SettingError(name, _shown(name, raw, rule), "must be true or false")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        raise SettingError(name, _shown(name, raw, rule), f"not {what}") from None
    return raw


def normalise_origin(origin: str) -> str:
    """Origins compare case-insensitively and without a trailing slash (RFC 6454)."""
    return origin.strip().rstrip("/").lower()
