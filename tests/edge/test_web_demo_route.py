"""The edge serves the web demo page and the web client only when RELAY_WEB_DEMO is on."""

from __future__ import annotations

import aiohttp
from yarl import URL

from relay.settings import Settings
from tests.helpers.edge import running_edge


async def _status(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    # encoded=True: the path goes out as written, dot segments and all.
    async with http.get(URL(url, encoded=True), allow_redirects=False) as response:
        return response.status, response.headers.get("Content-Type", "")


async def test_production_edges_serve_no_demo_page(settings: Settings) -> None:
    async with running_edge(settings, "edge-plain") as ws_url, aiohttp.ClientSession() as http:
        base = ws_url.replace("ws://", "http://")
        assert (await _status(http, f"{base}/demo/"))[0] == 404
        assert (await _status(http, f"{base}/demo/lib/relay-client.js"))[0] == 404


async def test_demo_edges_serve_the_page_and_the_library(settings: Settings) -> None:
    demo = settings.with_overrides(web_demo=True)
    async with running_edge(demo, "edge-demo") as ws_url, aiohttp.ClientSession() as http:
        base = ws_url.replace("ws://", "http://")
        assert await _status(http, f"{base}/demo/") == (200, "text/html")
        assert (await _status(http, f"{base}/demo"))[0] == 302
        assert (await _status(http, f"{base}/demo/demo.js"))[0] == 200
        assert (await _status(http, f"{base}/demo/lib/relay-client.js"))[0] == 200
        # Nothing outside the two folders: not the package's Python files.
        for escape in ("/demo/../settings.py", "/demo/lib/../../settings.py",
                       "/demo/..%2f..%2fsettings.py", "/demo/lib/%2e%2e/%2e%2e/settings.py"):
            assert (await _status(http, base + escape))[0] in (403, 404), escape
