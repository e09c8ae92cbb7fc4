"""The fault suite's own Redis server: a valkey-server process it can freeze, kill and restart on
the same port and data directory (the shared test server must never be touched)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from relay.dev.embedded import free_port, server_binary


class RedisProcess:
    """valkey-server on 127.0.0.1 with an append-only file (fsync every second) when ``aof``."""

    def __init__(self, *, aof: bool = True) -> None:
        self.port = free_port()
        self.aof = aof
        self.dir = tempfile.mkdtemp(prefix="relay-faults-valkey-")
        self._proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout_s: float = 30.0) -> None:
        args = [str(server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--maxclients", "20000",
                "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec",
                "--loglevel", "warning"]
        log = open(os.path.join(self.dir, "server.log"), "ab")  # noqa: SIM115 - the child owns it
        self._proc = subprocess.Popen(args, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # +PONG only once the AOF is loaded
            if self._proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited; see {self.dir}/server.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"valkey-server not ready on {self.port}")

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (a long fork, a VM pause)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)
            self.paused = False

    def kill(self) -> None:
        """SIGKILL: with AOF, up to the last second of writes may be lost."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.paused = False

    def stop(self) -> None:
        """SIGTERM: a clean shutdown that flushes the append-only file."""
        if self._proc is not None and self._proc.poll() is None:
            if self.paused:
                self.resume()
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def wipe(self) -> None:
        """Forget every persisted byte (for a restart that comes back empty)."""
        for name in os.listdir(self.dir):
            if name != "server.log":
                path = os.path.join(self.dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
