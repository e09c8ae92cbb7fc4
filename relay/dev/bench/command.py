"""``relay bench`` arguments and the entry point the CLI dispatches to."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay.dev.bench.options import BenchOptions
from relay.dev.bench.schedule import ConversationShape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small counts, under a minute: a correctness smoke run")
    parser.add_argument("--paths", default=None, help="edge,full (default both)")
    parser.add_argument("--edge-steps", default=None, help="conversation counts, e.g. 500,1000")
    parser.add_argument("--edge-target", type=int, default=None)
    parser.add_argument("--full-steps", default=None)
    parser.add_argument("--full-target", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per step")
    parser.add_argument("--turn-seconds", type=float, default=None)
    parser.add_argument("--client-processes", type=int, default=None)
    parser.add_argument("--bisect", type=int, default=None)
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the naive-edge and python-socketio runs at each edge step")
    parser.add_argument("--kill-at", type=int, default=None,
                        help="conversations of the step that kills the edge's pub/sub "
                             "connection mid-load (0 = skip it)")
    parser.add_argument("--profile-seconds", type=float, default=None,
                        help="py-spy the edge and the producer this long (0 = off)")
    parser.add_argument("--out", type=Path, default=None, help="bench/results/latest.json")
    parser.add_argument("--record", type=Path, default=None,
                        help="append this run's figures to a markdown file (docs/benchmarks.md)")
    # Latency run (relay/dev/bench/latency.py): submit -> first audio / frames at the client.
    parser.add_argument("--latency", action="store_true",
                        help="measure submit -> first audio and first frames instead")
    parser.add_argument("--latency-counts", default=None, help="conversations, e.g. 1,20,100")
    parser.add_argument("--latency-turns", type=int, default=None, help="turns per conversation")
    # Join cost (relay/dev/bench/joins.py): edge CPU per join and per refusal.
    parser.add_argument("--joins", action="store_true",
                        help="measure what a client's join (and a refusal) costs an edge instead")
    parser.add_argument("--joins-per-round", type=_joins_per_round, default=None,
                        help="joins per round (1000; 2 rounds, then one refused round)")
    # Queue cost (relay/dev/bench/queue_cost.py): Redis time per submit and take, by clip.
    parser.add_argument("--queue-cost", action="store_true",
                        help="measure what submitting and taking a clip turn costs Redis instead")
    # Append cost (relay/dev/bench/append_cost.py): Redis per entry of the fenced append script.
    parser.add_argument("--append-cost", action="store_true",
                        help="measure what the fenced append costs Redis per entry instead, "
                             "against plain XADD (and SPUBLISH) of the same entries")
    parser.add_argument("--instructions", action="store_true",
                        help="with --append-cost or --queue-cost: also count Valkey's "
                             "instructions per entry, or per submit and take, under valgrind's "
                             "callgrind (about 90 s or two minutes more)")
    parser.add_argument("--latency-settle-s", type=_seconds, default=None,
                        help="pause between rounds, after every turn of one ended (0.5)")
    parser.add_argument("--redis-delay-ms", type=_delay_ms, default=None,
                        help="put the producer's and the edge's Redis this many ms away, each "
                             "way, through a delaying proxy (0: loopback)")
    parser.add_argument("--first-batch-delay-ms", type=int, default=None,
                        help="the simulator's delay before a request's first animation batch")


def _number_in(low: float, high: float, unit: str) -> Callable[[str], float]:
    """An argparse type: a number from ``low`` to ``high``, or a one-line error naming both."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # NaN included
            raise argparse.ArgumentTypeError(f"{text}: {unit} from {low:g} to {high:g}")
        return value

    return parse


_seconds = _number_in(0, 60, "seconds")
_delay_ms = _number_in(0, 100, "milliseconds")


def _joins_per_round(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 20000:
        raise argparse.ArgumentTypeError(f"{text}: a count from 1 to 20000")
    return int(text)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def options_from(args: argparse.Namespace) -> BenchOptions:
    options = BenchOptions.quick_mode() if args.quick else BenchOptions()
    changes: dict[str, Any] = {}
    if args.paths:
        changes["paths"] = tuple(p.strip() for p in args.paths.split(","))
    if args.edge_steps:
        changes["edge_steps"] = _ints(args.edge_steps)
    if args.full_steps:
        changes["full_steps"] = _ints(args.full_steps)
    if args.no_peers:
        changes["peers"] = False
    for name in ("edge_target", "full_target", "client_processes", "bisect", "kill_at"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.duration is not None:
        changes["duration_s"] = args.duration
    if args.profile_seconds is not None:
        changes["profile_s"] = args.profile_seconds
    if args.turn_seconds is not None:
        changes["shape"] = ConversationShape(turn_s=args.turn_seconds,
                                             gap_s=options.shape.gap_s)
    if args.out is not None:
        changes["out"] = args.out
    if args.record is not None:
        changes["markdown"] = args.record
    return replace(options, **changes)


def joins_options_from(args: argparse.Namespace) -> Any:
    from relay.dev.bench.joins import JoinsOptions

    options = JoinsOptions.quick_mode() if args.quick else JoinsOptions()
    changes: dict[str, Any] = {}
    if args.joins_per_round is not None:
        changes["per_round"] = args.joins_per_round
    if args.out is not None:
        changes["out"] = args.out
    return replace(options, **changes)


def queue_cost_options_from(args: argparse.Namespace) -> Any:
    from relay.dev.bench.queue_cost import QueueCostOptions

    options = (QueueCostOptions.quick_mode(instructions=args.instructions) if args.quick
               else QueueCostOptions(instructions=args.instructions))
    return replace(options, out=args.out) if args.out is not None else options


def append_cost_options_from(args: argparse.Namespace) -> Any:
    from relay.dev.bench.append_cost import AppendCostOptions

    options = (AppendCostOptions.quick_mode(instructions=args.instructions) if args.quick
               else AppendCostOptions(instructions=args.instructions))
    return replace(options, out=args.out) if args.out is not None else options


def latency_options_from(args: argparse.Namespace) -> Any:
    from relay.dev.bench.latency import LatencyOptions

    options = LatencyOptions.quick_mode() if args.quick else LatencyOptions()
    changes: dict[str, Any] = {}
    if args.latency_counts:
        changes["counts"] = _ints(args.latency_counts)
    if args.latency_turns is not None:
        changes["turns"] = args.latency_turns
    if args.first_batch_delay_ms is not None:
        changes["first_batch_delay_ms"] = args.first_batch_delay_ms
    if args.latency_settle_s is not None:
        changes["settle_s"] = args.latency_settle_s
    if args.redis_delay_ms is not None:
        changes["redis_delay_ms"] = args.redis_delay_ms
    if args.out is not None:
        changes["out"] = args.out
    return replace(options, **changes)


def main(argv: list[str]) -> int:
    """``relay bench ARGS``: the bench's own parser, loaded only by this command."""
    parser = argparse.ArgumentParser(prog="relay bench", description="measure the relay against "
                                     "a bare Redis loop on this machine (loopback only)")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run, write the JSON (latest and a per-run copy), print the table; 0 when delivery was
    correct everywhere (timing targets never decide the exit code)."""
    from relay.dev.bench.measure import correct
    from relay.dev.bench.report import markdown_section, render_table
    from relay.dev.bench.runner import run as run_bench

    command = "relay " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.instructions and not (args.append_cost or args.queue_cost):
        print("relay bench: --instructions counts only with --append-cost or --queue-cost",
              file=sys.stderr)
        return 2
    if args.latency:
        from relay.dev.bench.latency import run_command

        return run_command(latency_options_from(args), command, args.record)
    if args.joins:
        from relay.dev.bench import joins

        return joins.run_command(joins_options_from(args), command)
    if args.queue_cost:
        from relay.dev.bench import queue_cost

        return queue_cost.run_command(queue_cost_options_from(args), command)
    if args.append_cost:
        from relay.dev.bench import append_cost

        return append_cost.run_command(append_cost_options_from(args), command)
    options = options_from(args)
    result = run_bench(options, command)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str)
    options.out.write_text(text)
    (options.out.parent / f"{result['run_id']}.json").write_text(text)
    print(render_table(result), flush=True)
    print(f"\nresults: {options.out} (copy: {options.out.parent / (result['run_id'] + '.json')})")
    if options.markdown is not None:
        with options.markdown.open("a") as doc:
            doc.write("\n" + markdown_section(result))
        print(f"figures appended to {options.markdown}")
    paths = [result[k] for k in ("edge_path", "full_path") if k in result]
    return 0 if all(correct(p) for p in paths) else 1
