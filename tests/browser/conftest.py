"""Browser tests: the web client and the demo page in headless Chromium (Debian's `chromium`,
driven by Playwright from PyPI with `executable_path`; no browser is ever downloaded), against
real edge, producer and simulator processes.

Where Chromium, Playwright or the web client's node modules are missing, the tests are skipped
and the run ends with one line saying so and how to enable them (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from relay.dev.stack import LocalStack, child_env
from relay.dev.webdemo import DemoControl, start_control
from relay.keys import Keys
from relay.redis_conn import create_client
from relay.settings import Settings
from tests.conftest import TEST_SECRET
from workers.queue.submit import TurnQueue

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    if CHROMIUM is None:
        return "no chromium on PATH"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed"
    if not (ROOT / "relay/client/web/node_modules/@msgpack/msgpack").is_dir():
        return "the web client's node modules are missing"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = missing()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            # "[web]": the root conftest sums these skips up in one line with ENABLE.
            item.add_marker(pytest.mark.skip(reason=f"[web] {reason}"))


@dataclass
class WebStack:
    local: LocalStack
    edges: list[str]
    queue: TurnQueue
    keys: Keys
    redis: Any
    control_url: str

    def page_url(self, conversation: str, *, edges: list[str] | None = None,
                 token_ttl: int | None = None) -> str:
        chosen = edges or self.edges
        base = chosen[0].replace("ws://", "http://", 1)
        url = (f"{base}/demo/?conversation={conversation}&control={self.control_url}"
               f"&edges={','.join(chosen)}")
        return url + (f"&token_ttl={token_ttl}" if token_ttl else "")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def web_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory
                    ) -> AsyncIterator[WebStack]:
    prefix = f"test-web-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, key_prefix=prefix, token_secret=TEST_SECRET,
                        log_json=False)
    env = child_env(settings, redis_url, TEST_SECRET)
    # No clock-skew allowance, so a short-lived token really expires within the test.
    env["RELAY_TOKEN_LEEWAY_S"] = "0"
    local = LocalStack(env, tmp_path_factory.mktemp("web") / "logs")
    redis = create_client(redis_url, block_ms=2000)
    runner = None
    try:
        await local.start_sim()
        await local.start_producer("producer-1")
        edges = [(await local.start_edge(f"edge-{n}", RELAY_WEB_DEMO="true"))[1] for n in (1, 2)]
        keys = Keys(prefix)
        queue = TurnQueue(redis, keys, input_ttl_s=300)

        async def submit(conversation_id: str, pcm: bytes, sample_rate: int) -> str:
            return await queue.submit_clip(conversation_id, pcm, sample_rate=sample_rate)

        runner, control_url = await start_control(
            DemoControl(TEST_SECRET, submit, queue.interrupt, 16000, local.sim_url))
        yield WebStack(local, edges, queue, keys, redis, control_url)
    finally:
        if runner is not None:
            await runner.cleanup()
        await local.stop()
        await redis.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            # Audio plays without a click: the page is driven by the test, not by a person.
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield chromium
        await chromium.close()
