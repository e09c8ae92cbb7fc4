"""The demo page and the web client in headless Chromium against real edge processes.

Each page is the demo page exactly as `relay run` serves it: the web library, the stand-in
AvatarKit player on Web Audio, and the drawing. The truth is the conversation stream in Redis and
the clips the test submitted.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay.dev.demo import speech_like_pcm
from relay.streams import read_after
from tests.browser.conftest import WebStack

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

RATE = 16000
SHOTS = Path(__file__).resolve().parents[2] / ".run" / "screenshots"

# What the page saw: stream ids in order, the PCM it scheduled per reply, connection history.
_STATE = """() => {
  const d = window.relayDemo;
  const b64 = (chunks) => {
    let text = "";
    for (const c of chunks) for (let i = 0; i < c.length; i += 8192) {
      text += String.fromCharCode(...c.subarray(i, i + 8192));
    }
    return btoa(text);
  };
  return {
    ids: d.messages.map((m) => m.id), kinds: d.messages.map((m) => m.kind),
    replies: d.player.history.map((h) => ({
      audio: b64(h.audio), keyframes: h.keyframes.length, audioOnly: h.audioOnly,
      interrupted: !!h.interrupted })),
    welcomes: d.welcomes, closes: d.closes, errors: d.errors, tokens: d.tokens,
    interrupts: d.player.interrupts, playing: d.player.playing, dropped: d.player.dropped,
    current: d.player.conversation ? d.player.conversation.id : null,
    cid: d.client.adapter.conversationId, refreshes: d.client.tokenRefreshes,
    state: d.client.state, edge: d.client.edge,
  };
}"""


async def open_demo(browser: Any, url: str) -> Any:
    page = await browser.new_page(viewport={"width": 1050, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    await page.wait_for_function("window.relayDemo && window.relayDemo.ready", timeout=15_000)
    assert errors == []
    return page


async def state(page: Any) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(_STATE)
    return result


async def wait_kinds(page: Any, kind: str, count: int, timeout_ms: int = 30_000) -> None:
    await page.wait_for_function(
        f"window.relayDemo.messages.filter((m) => m.kind === '{kind}').length >= {count}",
        timeout=timeout_ms)


async def truth(stack: WebStack, conversation: str) -> list[str]:
    rows = await read_after(stack.redis, stack.keys, conversation, "0-0", count=100_000)
    return [entry_id for entry_id, _ in rows]


def audio_of(reply: dict[str, Any]) -> bytes:
    return base64.b64decode(reply["audio"])


async def stream_clip(stack: WebStack, conversation: str, clip: bytes, *, until_frames: Any,
                      chunk: int = 1280) -> tuple[Any, int]:
    """Start a streamed turn and feed it until the page has seen frames; returns (input, sent)."""
    streamed = await stack.queue.open_streamed(conversation, sample_rate=RATE)
    sent = 0
    while sent < len(clip) // 2:
        await streamed.send(clip[sent:sent + chunk])
        sent += chunk
    await streamed.flush()
    await until_frames()
    return streamed, sent


async def test_concurrent_turns_arrive_once_in_order_and_play_byte_for_byte(
        web_stack: WebStack, browser: Any) -> None:
    conversations = [f"web-multi-{n}" for n in range(3)]
    pages = [await open_demo(browser, web_stack.page_url(c)) for c in conversations]
    clips = {c: [speech_like_pcm(1.0 + 0.3 * t, RATE, seed=10 * n + t) for t in range(2)]
             for n, c in enumerate(conversations)}
    # Every turn queued up front: they run concurrently across conversations and one after
    # another, in submission order, within each.

    async def submit_all(conversation: str) -> None:
        for clip in clips[conversation]:
            await web_stack.queue.submit_clip(conversation, clip, sample_rate=RATE)

    await asyncio.gather(*(submit_all(c) for c in conversations))
    for page in pages:
        await wait_kinds(page, "turn_end", 2)
    for conversation, page in zip(conversations, pages, strict=True):
        seen = await state(page)
        assert seen["ids"] == await truth(web_stack, conversation)
        assert [audio_of(r) for r in seen["replies"]] == clips[conversation]
        assert all(r["keyframes"] > 0 and not r["audioOnly"] for r in seen["replies"])
        assert seen["errors"] == [] and seen["dropped"] == 0
        await page.close()


async def test_edge_sigkilled_mid_turn_page_resumes_on_the_other_edge(
        web_stack: WebStack, browser: Any) -> None:
    doomed, url = await web_stack.local.start_edge("edge-doomed", RELAY_WEB_DEMO="true")
    conversation = "web-failover"
    page = await open_demo(browser, web_stack.page_url(
        conversation, edges=[url, web_stack.edges[1]]))
    clip = speech_like_pcm(3.0, RATE, seed=7)

    async def frames_seen() -> None:
        await wait_kinds(page, "frames", 2)

    streamed, sent = await stream_clip(web_stack, conversation, clip, until_frames=frames_seen)
    before = len((await state(page))["ids"])
    doomed.kill()  # SIGKILL: no close frame, the page sees 1006
    await page.wait_for_function("window.relayDemo.welcomes.length >= 2", timeout=15_000)
    await streamed.send(clip[sent:])
    await streamed.end()
    await wait_kinds(page, "turn_end", 1)
    seen = await state(page)
    assert before > 0
    assert seen["ids"] == await truth(web_stack, conversation)
    assert audio_of(seen["replies"][0]) == clip and len(seen["replies"]) == 1
    assert [c["code"] for c in seen["closes"]] == [1006]
    assert seen["welcomes"][-1]["start"] == "resume" and seen["welcomes"][-1]["recovered"] is True
    assert seen["edge"] == web_stack.edges[1]
    await page.close()


async def test_interrupt_resets_the_player_and_the_next_turn_starts_clean(
        web_stack: WebStack, browser: Any) -> None:
    conversation = "web-interrupt"
    page = await open_demo(browser, web_stack.page_url(conversation))
    clip = speech_like_pcm(4.0, RATE, seed=3)

    async def frames_seen() -> None:
        await wait_kinds(page, "frames", 1)

    streamed, _ = await stream_clip(web_stack, conversation, clip, until_frames=frames_seen)
    playing = (await state(page))["playing"]
    assert await web_stack.queue.interrupt(conversation) is not None
    await wait_kinds(page, "interrupt", 1)
    after = await state(page)
    assert playing > 0  # audio was scheduled and sounding when the interrupt came
    assert after["interrupts"] == 1 and after["playing"] == 0
    assert after["current"] is None and after["cid"] is None
    assert after["replies"][0]["interrupted"]

    clip2 = speech_like_pcm(1.0, RATE, seed=4)
    await web_stack.queue.submit_clip(conversation, clip2, sample_rate=RATE)
    await wait_kinds(page, "turn_end", 1)
    seen = await state(page)
    assert seen["ids"] == await truth(web_stack, conversation)
    assert len(seen["replies"]) == 2 and audio_of(seen["replies"][1]) == clip2
    assert seen["cid"] == "standin-2"  # a fresh conversation id from the SDK stand-in
    await page.close()


async def test_token_expiring_mid_connection_is_refreshed_through_the_callback(
        web_stack: WebStack, browser: Any) -> None:
    conversation = "web-refresh"
    # Tokens of 2 s and no clock-skew allowance on the edges: the token expires mid-turn.
    page = await open_demo(browser, web_stack.page_url(conversation, token_ttl=2))
    clip = speech_like_pcm(3.0, RATE, seed=9)
    streamed = await web_stack.queue.open_streamed(conversation, sample_rate=RATE)
    for offset in range(0, len(clip), 3200):  # 100 ms of audio every 100 ms: 3 s in all
        await streamed.send(clip[offset:offset + 3200])
        await streamed.flush()
        await asyncio.sleep(0.1)
    await streamed.end()
    await wait_kinds(page, "turn_end", 1)
    seen = await state(page)
    assert 4402 in [c["code"] for c in seen["closes"]]
    assert seen["refreshes"] >= 1 and seen["tokens"] >= 2
    assert seen["ids"] == await truth(web_stack, conversation)
    assert audio_of(seen["replies"][0]) == clip
    # Still connected (or between a 4402 and the next welcome: the 2 s tokens keep expiring).
    assert seen["state"] in ("open", "refreshing", "connecting") and seen["errors"] == []
    await page.close()


async def test_screenshot_of_the_demo_shows_the_animation_drawn(
        web_stack: WebStack, browser: Any) -> None:
    conversation = "web-screenshot"
    page = await open_demo(browser, web_stack.page_url(conversation))
    await page.click("#speak")  # the page's own button: the control speaks a 2-4 s turn
    await wait_kinds(page, "frames", 10)
    # Wait until the face is drawn from a keyframe on the audio clock with the mouth open.
    await page.wait_for_function(
        "(() => { const k = window.relayDemo.player.currentKeyframe();"
        " return k !== null && k.jaw_pose[0] > 0.15; })()", timeout=10_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / "web-demo.png"))
    # Then watch the canvases for a second of animation frames.
    drawn = await page.evaluate("""async () => {
      const count = (id, test) => {
        const c = document.getElementById(id);
        const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4) {
          if (test(data[i], data[i + 1], data[i + 2], data[i + 3])) n++;
        }
        return n;
      };
      const mouth = [];
      const until = performance.now() + 1000;
      while (performance.now() < until) {
        await new Promise((resolve) => requestAnimationFrame(resolve));
        mouth.push(count("avatar", (r, g, b, a) => a > 0 && r > 100 && g < 60 && b < 70));
      }
      return {
        frames: mouth.length, mouthMin: Math.min(...mouth), mouthMax: Math.max(...mouth),
        face: count("avatar", (r, g, b, a) => a > 0),
        keyframeLine: count("chart", (r, g, b, a) => a > 0 && g > 110 && r < 60 && b < 90),
        audioBars: count("chart", (r, g, b, a) => a > 0 && b > r + 40),
      };
    }""")
    # A face; a mouth that opens and closes with the keyframes (closed it is a ~360-pixel slit);
    # the keyframe curve and the audio levels on the chart.
    assert drawn["frames"] > 10 and drawn["face"] > 20_000
    assert drawn["mouthMax"] > 1200 and drawn["mouthMax"] - drawn["mouthMin"] > 400
    assert drawn["keyframeLine"] > 200 and drawn["audioBars"] > 200
    await page.close()


# A page written from relay/client/web/README.md alone: its import map, its RelayClient options,
# its position store for a reload; a recording object stands in for view.controller.
README_PAGE = """<!doctype html>
<script type="importmap">
  { "imports": {
      "@avatar-relay/web-client": "/relay-client.js",
      "@msgpack/msgpack": "/node_modules/@msgpack/msgpack/dist.esm/index.mjs" } }
</script>
<script type="module">
  import { RelayClient } from "@avatar-relay/web-client";
  const params = new URLSearchParams(location.search);
  const conversation = params.get("conversation");
  const load = (key) => JSON.parse(sessionStorage.getItem(key) || "[]");
  const save = (key, value) => sessionStorage.setItem(key, JSON.stringify(value));
  const record = (entry) => save("calls", [...load("calls"), entry]);
  const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  let minted = false;
  const controller = {
    yieldAudioData(audio, end) {
      record(["audio", hex(audio), end]);
      if (minted) return null;
      minted = true;
      return "cid-" + Date.now();
    },
    yieldFramesData(frames, cid) { record(["frames", frames.length, cid]); },
    interrupt() { record(["interrupt"]); },
  };
  async function fetchRelayToken(conversationId) {
    const query = `conversation=${encodeURIComponent(conversationId)}`;
    const response = await fetch(`${params.get("control")}/token?${query}`);
    if (!response.ok) throw new Error(`token endpoint answered ${response.status}`);
    return (await response.json()).token;
  }
  window.relay = new RelayClient({
    edges: params.get("edges").split(","),
    conversationId: conversation,
    token: () => fetchRelayToken(conversation),
    refreshToken: () => fetchRelayToken(conversation),
    controller,
    lastId: sessionStorage.getItem("relay:" + conversation),
    onPosition: (id) => sessionStorage.setItem("relay:" + conversation, id),
    onMessage: (m) => {
      if (m.id) save("ids", [...load("ids"), m.id]);
      if (m.kind === "turn_end") sessionStorage.setItem("ended", "yes");
    },
    onWelcome: (w) => save("welcomes", [...load("welcomes"), w.start + ":" + w.recovered]),
  }).start();
</script>
"""


async def test_page_written_from_the_readme_connects_and_resumes_after_a_reload(
        web_stack: WebStack, browser: Any) -> None:
    web_dir = Path(__file__).resolve().parents[2] / "relay" / "client" / "web"

    # The developer's own app server: the page and the two files the README says to serve.
    app = web.Application()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=README_PAGE, content_type="text/html")

    async def library(request: web.Request) -> web.FileResponse:
        return web.FileResponse(web_dir / "relay-client.js")

    app.router.add_get("/", index)
    app.router.add_get("/relay-client.js", library)
    app.router.add_static("/node_modules/", web_dir / "node_modules")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    conversation = "web-readme"
    page = await browser.new_page()
    await page.goto(f"{origin}/?conversation={conversation}"
                    f"&control={web_stack.control_url}&edges={','.join(web_stack.edges)}")
    await page.wait_for_function("window.relay && window.relay.state === 'open'")
    clip = speech_like_pcm(3.0, RATE, seed=21)

    async def frames_seen() -> None:
        await page.wait_for_function(
            "JSON.parse(sessionStorage.getItem('calls') || '[]')"
            ".some((c) => c[0] === 'frames')", timeout=15_000)

    streamed, sent = await stream_clip(web_stack, conversation, clip, until_frames=frames_seen)
    await page.reload()  # mid-turn: the new page resumes from the stored position
    await page.wait_for_function("window.relay && window.relay.state === 'open'")
    await streamed.send(clip[sent:])
    await streamed.end()
    await page.wait_for_function("sessionStorage.getItem('ended') === 'yes'", timeout=20_000)
    calls = await page.evaluate("JSON.parse(sessionStorage.getItem('calls'))")
    ids = await page.evaluate("JSON.parse(sessionStorage.getItem('ids'))")
    welcomes = await page.evaluate("JSON.parse(sessionStorage.getItem('welcomes'))")
    assert ids == await truth(web_stack, conversation)
    assert b"".join(bytes.fromhex(c[1]) for c in calls if c[0] == "audio") == clip
    assert welcomes == ["live:null", "resume:true"]  # the reloaded page resumed
    assert "interrupt" not in [c[0] for c in calls]
    await page.close()
    await runner.cleanup()


async def test_the_motion_failure_button_shows_the_audio_only_fallback(
        web_stack: WebStack, browser: Any) -> None:
    conversation = "web-fault"
    page = await open_demo(browser, web_stack.page_url(conversation))
    await page.click("#speak-fault")
    await wait_kinds(page, "turn_end", 1)
    seen = await state(page)
    assert "audio_only" in seen["kinds"] and seen["replies"][0]["audioOnly"]
    assert seen["ids"] == await truth(web_stack, conversation)
    assert await page.locator("#timeline li.audio_only").count() == 1
    await page.close()
