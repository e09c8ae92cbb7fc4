"""The demo page's control: a small loopback HTTP service of ``relay run`` (dev tooling only).

The page itself (``page/``) and the web client are static files the edges serve at ``/demo/``
when ``RELAY_WEB_DEMO`` is on (``relay run`` turns it on). What a static page cannot do is mint
tokens or speak turns; this service does both for the page, on 127.0.0.1 only:

    GET  /token?conversation=C[&ttl=S]          {"token": ...}  (a JWT for C, ttl 1 h by default)
    POST /turn?conversation=C[&fault=motion]    {"turn": ...}   a speech-like clip as a turn;
                                                fault=motion makes the simulator fail mid-turn
    POST /interrupt?conversation=C              {"interrupted": turn id or null}

Answers carry ``Access-Control-Allow-Origin: *``: the page comes from an edge's origin.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from relay.dev.demo import speech_like_pcm
from relay.errors import InvalidConversationId
from relay.keys import validate_conversation_id
from relay.tokens import MAX_TTL_S, mint_token

PAGE_PATH = "/demo/"
DEFAULT_CONVERSATION = "web-demo"
# Spoken turns are 2 to 4 s: long enough to watch, short enough to repeat.
_TURN_SECONDS = (2.0, 4.0)

Submit = Callable[[str, bytes, int], Awaitable[str]]
Interrupt = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True)
class DemoControl:
    secret: str
    submit: Submit
    interrupt: Interrupt
    sample_rate: int
    sim_url: str | None = None  # the simulator, for fault=motion


def _conversation(request: web.Request) -> str:
    conversation = request.query.get("conversation", DEFAULT_CONVERSATION)
    try:
        validate_conversation_id(conversation)
    except InvalidConversationId as exc:
        raise web.HTTPBadRequest(text=str(exc)) from exc
    return conversation


def _json(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, headers={"Access-Control-Allow-Origin": "*"})


def control_app(control: DemoControl) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        try:
            ttl = int(request.query.get("ttl") or 3600)
        except ValueError:
            ttl = 0
        if not 0 < ttl <= MAX_TTL_S:
            return _json({"error": f"ttl must be 1 to {MAX_TTL_S} seconds"}, 400)
        return _json({"token": mint_token(control.secret, _conversation(request), ttl_s=ttl)})

    async def turn(request: web.Request) -> web.Response:
        conversation = _conversation(request)
        if request.query.get("fault") == "motion":
            if control.sim_url is None:
                return _json({"error": "no simulator: faults need the local Motion Server"}, 409)
            async with aiohttp.ClientSession() as http, http.post(
                    f"{control.sim_url}/_sim/faults",
                    json={"kind": "server_error", "after_keyframes": 20}) as answer:
                if answer.status != 201:
                    return _json({"error": f"simulator answered {answer.status}"}, 502)
        seconds = random.uniform(*_TURN_SECONDS)
        clip = speech_like_pcm(seconds, control.sample_rate, seed=random.randrange(1000))
        turn_id = await control.submit(conversation, clip, control.sample_rate)
        return _json({"turn": turn_id, "seconds": round(seconds, 2)})

    async def interrupt(request: web.Request) -> web.Response:
        return _json({"interrupted": await control.interrupt(_conversation(request))})

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_post("/turn", turn)
    app.router.add_post("/interrupt", interrupt)
    return app


async def start_control(control: DemoControl, host: str = "127.0.0.1",
                        port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve the control on loopback; returns the runner (clean it up) and its base URL."""
    runner = web.AppRunner(control_app(control), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://{host}:{bound}"


def page_url(edges: list[str], control_url: str,
             conversation: str = DEFAULT_CONVERSATION) -> str:
    """The demo page on the first edge, told about every edge and the control."""
    first = edges[0].replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    return (f"{first}{PAGE_PATH}?conversation={conversation}&control={control_url}"
            f"&edges={','.join(edges)}")
