"""The test control API under ``/_sim``: arm, list and clear fault rules, read counters.

``POST /_sim/faults`` (one rule object or a list), ``GET /_sim/faults``, ``DELETE /_sim/faults``,
``GET /_sim/stats``, ``GET /_sim/first-batches`` (per recent request id, the milliseconds from its
first audio to its first animation message as sent: what the latency bench subtracts as the
simulator's own time). Nothing here is authenticated, so bind the simulator to localhost.
"""

from __future__ import annotations

from aiohttp import web

from relay.dev.motion_sim.faults import FaultRule
from relay.dev.motion_sim.sim import SIM_KEY


def _parse_rules(body: object) -> list[FaultRule]:
    rules = []
    for item in body if isinstance(body, list) else [body]:
        if not isinstance(item, dict):
            raise ValueError("a fault rule must be a JSON object")
        rules.append(FaultRule.from_json(item))
    return rules


async def handle_add_faults(request: web.Request) -> web.Response:
    """Arm one rule (a JSON object) or several (a list); all or nothing."""
    sim = request.app[SIM_KEY]
    try:
        rules = _parse_rules(await request.json())
    except ValueError as error:
        return web.json_response({"error": str(error)}, status=400)
    for rule in rules:
        sim.add_fault(rule)
    return web.json_response({"faults": sim.faults()}, status=201)


async def handle_list_faults(request: web.Request) -> web.Response:
    return web.json_response({"faults": request.app[SIM_KEY].faults()})


async def handle_clear_faults(request: web.Request) -> web.Response:
    request.app[SIM_KEY].clear_faults()
    return web.json_response({"faults": []})


async def handle_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_KEY].stats.as_dict())


async def handle_first_batches(request: web.Request) -> web.Response:
    return web.json_response({"first_batches": request.app[SIM_KEY].first_batches()})
