"""The ``relay`` command: parses arguments, configures logging, dispatches. No business logic."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime

import structlog

from relay.errors import ConfigError, RelayError
from relay.logs import configure_logging, redact
from relay.settings import LOG_LEVELS, Settings, unknown_variables


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("avatar-relay")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _port(text: str) -> int:
    """A TCP port for --port options; 0 asks the system for a free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535; 0 = a free one)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive, finite number")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Redis Streams relay for Spatius AvatarKit backend mode. Settings come from "
        "the environment (see docs/operations.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True)

    edge = sub.add_parser("edge",
                          help="serve client WebSockets (needs REDIS_URL, RELAY_TOKEN_SECRET)")
    edge.add_argument("--host", default=None)
    edge.add_argument("--port", type=_port, default=None, help="0 = a free port")

    sub.add_parser("producer", help="run turns from the job queue through the Spatius SDK")

    sim = sub.add_parser("motion-sim", help="serve the local Motion Server simulator")
    sim.add_argument("--host", default=None)
    sim.add_argument("--port", type=_port, default=None, help="0 = a free port")

    # The bench is dev tooling: its own parser (``relay bench --help``) is loaded only when asked
    # for, so no role's process imports it; every argument after ``bench`` is left to it.
    sub.add_parser("bench", add_help=False,
                           help="measure the relay against a bare Redis loop on this machine "
                           "(loopback only); results in bench/results/latest.json")

    enqueue = sub.add_parser("enqueue", help="queue one turn from a .wav (PCM16 mono) or a raw "
                             ".pcm file; prints its turn id")
    enqueue.add_argument("conversation_id")
    enqueue.add_argument("audio", help=".wav (rate from its header) or .pcm (needs --rate)")
    enqueue.add_argument("--rate", type=_positive_int, default=None,
                         help="sample rate of a .pcm file")
    enqueue.add_argument("--avatar", default=None, help="avatar id (default SPATIUS_AVATAR_ID)")
    enqueue.add_argument("--deadline", type=_positive_float, default=None, metavar="SECONDS",
                         help="not played, and dead-lettered, unless a worker starts it in time")
    enqueue.add_argument("--turn-id", default=None, help="fixed turn id (retries are idempotent)")

    jobs = sub.add_parser("jobs", help="list queued, running and dead turns; drop or requeue a "
                          "dead one")
    jobs.add_argument("action", nargs="?", choices=["list", "drop", "requeue"], default="list")
    jobs.add_argument("dead_id", nargs="?", help="dead letter id (for drop and requeue)")
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(usage_error=jobs.error)

    token = sub.add_parser("token", help="mint a client token for one conversation")
    token.add_argument("conversation_id")
    token.add_argument("--ttl", type=_positive_int, default=None, help="lifetime in seconds")
    token.add_argument("--kid", default=None,
                       help="key id for the token header (default: none, which edges read as "
                       "RELAY_TOKEN_KID); with HS256 the secret of that kid in "
                       "RELAY_TOKEN_KEYS_FILE is used when it is there")
    token.add_argument("--key-file", default=None, metavar="PEM",
                       help="sign with this private key (RS256, ES256 or EdDSA by key type) "
                       "instead of the shared secret")

    watch = sub.add_parser("watch", help="show one conversation's stream as it happens: "
                           "turns, kinds, seq, sizes, gaps, interrupts")
    watch.add_argument("conversation_id")
    watch.add_argument("--edge", default=None, metavar="URL",
                       help="watch through this edge (ws://host:port) as a client sees it; "
                       "default: read the stream from Redis (REDIS_URL)")
    watch.add_argument("--token", default=None,
                       help="client token for --edge (default: minted with this deployment's keys)")
    watch.add_argument("--from-start", action="store_true",
                       help="from the stream: begin with the oldest retained entry, not new ones")
    watch.add_argument("--turns", type=_positive_int, default=None, metavar="N",
                       help="stop after N turns have ended")

    check = sub.add_parser("check", help="exit 0 when this role's dependencies are reachable")
    check.add_argument("--role", choices=["edge", "producer"], default="edge")

    for name, text in (("run", "start the whole stack locally and serve until Ctrl-C"),
                       ("demo", "start the whole stack, deliver demo conversations, verify, exit")):
        stack = sub.add_parser(name, help=text)
        stack.add_argument("--conversations", type=_positive_int, default=4)
        stack.add_argument("--turns", type=_positive_int, default=2)
        stack.add_argument("--producers", type=_positive_int, default=1)
        stack.add_argument("--edges", type=_positive_int, default=2)
        stack.add_argument("--edge-port", type=_port, default=None,
                           help="first edge's port (the others follow); 0 = free ports")
    return parser


# Commands a person runs at a terminal: readable output. The roles log JSON (RELAY_LOG_JSON).
_PLAIN = frozenset({"run", "demo", "token", "bench", "enqueue", "jobs", "watch"})


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "jobs" and args.action != "list" and not args.dead_id:
        args.usage_error(f"{args.action} needs a dead letter id (`relay jobs` lists them)")
    json_logs = args.command not in _PLAIN and _env_wants_json()
    configure_logging(json=json_logs)  # until the settings are read: startup errors too
    try:
        settings = Settings.from_env()
        for line in unknown_variables(os.environ):
            _fail(json_logs, "unknown_setting", line, level="warning")
        if args.log_level:
            settings = settings.with_overrides(log_level=args.log_level)
        json_logs = settings.log_json and args.command not in _PLAIN
        configure_logging(json=json_logs, level=settings.log_level)
        sys.exit(_dispatch(args, settings) or 0)
    except ConfigError as exc:
        _fail(json_logs, "configuration_error", f"configuration error: {exc}")
        sys.exit(2)
    except RelayError as exc:
        _fail(json_logs, "relay_error", str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        # A role that dies must say why on the same channel as everything else.
        if not json_logs:
            raise
        structlog.get_logger("relay").critical("fatal_error", error=repr(exc), exc_info=exc)
        sys.exit(1)


def _env_wants_json() -> bool:
    return os.environ.get("RELAY_LOG_JSON", "true").strip().lower() not in {
        "0", "false", "no", "off"}


def _fail(json_logs: bool, event: str, message: str, level: str = "error") -> None:
    """The last word of a command that cannot run: one JSON line for the roles (written here,
    not through structlog, which may not be configured yet), a plain sentence at a terminal.
    Start-up warnings take the same way (``level="warning"``)."""
    if json_logs:
        line = {"event": event, "level": level, level: redact(message),
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        print(json.dumps(line), file=sys.stderr)
    else:
        prefix = "" if level == "error" else f"{level}: "
        print(f"relay: {prefix}{message}", file=sys.stderr)


async def _jobs_command(args: argparse.Namespace, settings: Settings) -> int:
    from redis.exceptions import RedisError

    try:
        return await _jobs_action(args, settings)
    except (RedisError, OSError) as exc:
        print(f"relay: redis unavailable: {exc}", file=sys.stderr)
        return 1


def _warn(text: str) -> None:
    print(f"relay: warning: {text}", file=sys.stderr)


async def _jobs_action(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from workers.queue import admin

    if args.command == "enqueue":
        print(await admin.enqueue(settings, args.conversation_id, Path(args.audio),
                                  rate=args.rate, avatar_id=args.avatar,
                                  deadline_s=args.deadline, turn_id=args.turn_id,
                                  warn=_warn))
        return 0
    if args.action == "list":
        return await admin.list_jobs(settings, as_json=args.json, out=print)
    print(await admin.fix_dead_letter(settings, args.action, args.dead_id))
    return 0


def _dispatch(args: argparse.Namespace, settings: Settings) -> int | None:
    if args.command == "edge":
        from relay.edge.run import run_edge

        overrides = {k: v for k, v in (("edge_host", args.host), ("edge_port", args.port))
                     if v is not None}
        run_edge(settings.with_overrides(**overrides))
        return 0
    if args.command == "producer":
        from workers.run import run_producer

        return asyncio.run(run_producer(settings))
    if args.command == "motion-sim":
        from relay.dev.motion_sim.run import run_sim

        overrides = {k: v for k, v in (("sim_host", args.host), ("sim_port", args.port))
                     if v is not None}
        return asyncio.run(run_sim(settings.with_overrides(**overrides)))
    if args.command == "token":
        from relay.tokens import mint_with_settings

        print(mint_with_settings(settings, args.conversation_id, ttl_s=args.ttl,
                                 kid=args.kid, key_file=args.key_file))
        return 0
    if args.command == "bench":
        from relay.dev.bench.command import main as bench_main

        return bench_main(args.bench_args)
    if args.command in ("enqueue", "jobs"):
        return asyncio.run(_jobs_command(args, settings))
    if args.command == "watch":
        from relay.dev.watch import run_watch

        return asyncio.run(run_watch(settings, args.conversation_id, edge=args.edge,
                                     token=args.token, from_start=args.from_start,
                                     max_turns=args.turns))
    if args.command == "check":
        from relay.health import check

        return asyncio.run(check(settings, role=args.role))
    from relay.dev.stack import StackOptions, run_stack

    options = StackOptions(conversations=args.conversations, turns=args.turns,
                           producers=args.producers, edges=args.edges,
                           edge_port=settings.edge_port if args.edge_port is None
                           else args.edge_port,
                           serve_forever=args.command == "run")
    return asyncio.run(run_stack(settings, options))
