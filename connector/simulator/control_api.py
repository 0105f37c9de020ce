"""The simulator's own API under `/_sim`: play customers, inspect conversations, steer the clock,
queue faults. Tests and the CLI drive the simulator only through these routes.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any, Dict, List, Tuple

import aiohttp
from aiohttp import web

from .core import SIM, template_summary
from .delivery import MAX_CONNECTIONS, SIGNATURE_MODES, BotUnreachable
from .payloads import SpecError
from .state import Conversation
from .settings import KNOWN_STATUSES, WINDOW_MODES, SettingsError, check_delays, parse_delays, parse_statuses
from .templates import CATEGORIES, QUALITIES, STATUSES

MAX_WAIT = 120.0
MAX_BURST = 100_000


def problem(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def json_error(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 502: web.HTTPBadGateway}[status]
    return cls(text=json.dumps({"error": message}), content_type="application/json")


async def read_json(request: web.Request) -> Dict[str, Any]:
    """The request's JSON object (`{}` when empty); anything else is answered 400."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise json_error(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise json_error(400, "request body must be a JSON object")
    return body


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_clock(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].state.clock.to_json())


async def set_clock(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await read_json(request)
    try:
        if body.get("reset"):
            sim.state.clock.reset()
        elif "now" in body:
            sim.state.clock.set(float(body["now"]))
        elif "advance" in body:
            sim.state.clock.advance(float(body["advance"]))
        else:
            return problem(400, 'expected {"advance": seconds}, {"now": unix_ts} or {"reset": true}')
    except (TypeError, ValueError):
        return problem(400, "clock values must be numbers")
    sim.state.changed()
    return web.json_response(sim.state.clock.to_json())


async def _play(request: web.Request, items: List[Tuple[str, Dict[str, Any]]], split_entries: bool = False) -> Dict[str, Any]:
    try:
        return await request.app[SIM].play(items, split_entries=split_entries)
    except SpecError as exc:
        raise json_error(400, str(exc)) from None
    except BotUnreachable as exc:
        raise json_error(502, f"message not delivered: {exc}") from None


def first_answer(result: Dict[str, Any]) -> Dict[str, Any]:
    """The bot's answer to the first attempt (None: unreachable), and whether redelivery follows."""
    answer: Dict[str, Any] = {"webhook_status": result["webhook_status"]}
    if result["queued"]:
        answer["redelivery"] = "queued"
    return answer


async def customer_message(request: web.Request) -> web.Response:
    """One customer message → one signed webhook; answers the wamid and the bot's HTTP status."""
    spec = await read_json(request)
    result = await _play(request, [(request.match_info["wa_id"], spec)])
    return web.json_response({
        "wamid": result["wamids"][0],
        "timestamp": result["timestamps"][0],
        **first_answer(result),
    })


async def batch(request: web.Request) -> web.Response:
    """Several customer messages in ONE webhook POST (tests that the bot reads every one)."""
    body = await read_json(request)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return problem(400, 'expected {"messages": [{"wa_id": ..., "text": ...}, ...]}')
    items = []
    for i, spec in enumerate(messages):
        if not isinstance(spec, dict) or not spec.get("wa_id"):
            return problem(400, f"messages[{i}] needs a wa_id")
        spec = dict(spec)
        items.append((str(spec.pop("wa_id")), spec))
    result = await _play(request, items, split_entries=bool(body.get("split_entries")))
    return web.json_response({
        "wamids": result["wamids"],
        "timestamps": result["timestamps"],
        **first_answer(result),
    })


BURST_HELP = (
    'expected {"count": n, "customers"?: n (default count), "concurrency"?: n (default 100, at most '
    f'{MAX_CONNECTIONS}), "text"?: "burst {{n}}"}}: count at most {MAX_BURST}, customers at most count'
)


async def burst(request: web.Request) -> web.Response:
    """Many customer messages, one webhook each, as fast as the bot takes them (load tests)."""
    body = await read_json(request)
    count = body.get("count")
    customers = body.get("customers", count)
    concurrency = body.get("concurrency", 100)
    text = body.get("text", "burst {n}")
    numbers = (count, customers, concurrency)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers) or not isinstance(text, str):
        return problem(400, BURST_HELP)
    if not (1 <= count <= MAX_BURST and 1 <= customers <= count and 1 <= concurrency <= MAX_CONNECTIONS and text):
        return problem(400, BURST_HELP)
    return web.json_response(await request.app[SIM].burst(count, customers, concurrency, text))


async def raw_webhook(request: web.Request) -> web.Response:
    """Post an arbitrary body to the bot, validly signed, badly signed or unsigned. A probe: it
    is left out of the webhook counters so rejected forgeries don't read as delivery failures."""
    sim = request.app[SIM]
    body = await read_json(request)
    if not isinstance(body, dict) or "body" not in body:
        return problem(400, 'expected {"body": <json or string>, "signature": "valid"|"invalid"|"missing"}')
    signature = body.get("signature", "valid")
    if signature not in SIGNATURE_MODES:
        return problem(400, f"signature must be one of {SIGNATURE_MODES}")
    try:
        status, text = await sim.delivery.post(body["body"], signature=signature, counted=False)
    except BotUnreachable as exc:
        return problem(502, str(exc))
    return web.json_response({"status": status, "body": text})


async def verify(request: web.Request) -> web.Response:
    """Run Meta's subscription handshake against the bot (`GET ?hub.mode=subscribe&...`)."""
    sim = request.app[SIM]
    body = await read_json(request)
    challenge = str(body.get("challenge") or secrets.randbelow(10**9))
    params = {"hub.mode": "subscribe", "hub.verify_token": str(body.get("verify_token", "")), "hub.challenge": challenge}
    assert sim.delivery.session is not None
    try:
        async with sim.delivery.session.get(sim.settings.bot_webhook_url, params=params) as resp:
            text = await resp.text()
            return web.json_response({"status": resp.status, "body": text, "challenge": challenge, "echoed": text == challenge})
    except (aiohttp.ClientError, OSError) as exc:
        return problem(502, f"bot webhook unreachable: {exc!r}")


async def list_conversations(request: web.Request) -> web.Response:
    state = request.app[SIM].state
    now = state.clock.now()
    return web.json_response({
        "conversations": [
            {"wa_id": c.wa_id, "name": c.name, "messages": len(c.messages), "window_open": c.window_open(now)}
            for c in state.conversations.values()
        ]
    })


async def get_conversation(request: web.Request) -> web.Response:
    state = request.app[SIM].state
    conv = state.conversations.get(request.match_info["wa_id"])
    if conv is None:
        return problem(404, f"no conversation with {request.match_info['wa_id']}")
    return web.json_response(conv.to_json(state.clock.now()))


async def wait_conversation(request: web.Request) -> web.Response:
    """Long-poll until the conversation holds at least `outbound` (and `inbound`) messages; 408 on
    timeout with the conversation so far. Tests wait on this instead of sleeping."""
    state = request.app[SIM].state
    wa_id = request.match_info["wa_id"]
    try:
        want_out = int(request.query.get("outbound", "1"))
        want_in = int(request.query.get("inbound", "0"))
        timeout = min(float(request.query.get("timeout", "10")), MAX_WAIT)
    except ValueError:
        return problem(400, "outbound, inbound and timeout must be numbers")

    def ready() -> bool:
        conv = state.conversations.get(wa_id)
        if conv is None:
            return want_out <= 0 and want_in <= 0
        inbound = sum(1 for m in conv.messages if m.direction == "in")
        return len(conv.outbound) >= want_out and inbound >= want_in

    done = await state.wait_until(ready, timeout)
    conv = state.conversations.get(wa_id) or Conversation(wa_id=wa_id)
    return web.json_response(conv.to_json(state.clock.now()), status=200 if done else 408)


async def stats(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    return web.json_response({**sim.state.stats.to_json(), "pending_redeliveries": sim.delivery.pending_redeliveries})


async def reset(request: web.Request) -> web.Response:
    await request.app[SIM].reset()
    return web.json_response({"reset": True})


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response({"responses": list(request.app[SIM].state.faults)})


FAULTS_HELP = (
    'expected {"responses": [{"status": 429, "code": 130429}, {"status": 500}, {"async_code": 131026}, '
    '{"delay": 2}, {"hold": 5}, {"hold": 0, "drop": true}]}: status, code, async_code numbers; '
    "delay (before handling) and hold (after accepting, before answering; finite, >= 0) in seconds; "
    "drop true closes the connection without an answer once the hold is over"
)


def valid_fault(fault: Any) -> bool:
    if not isinstance(fault, dict):
        return False
    if not all(isinstance(fault.get(k, 0), (int, float)) for k in ("status", "code", "async_code", "delay")):
        return False
    hold = fault.get("hold", 0)
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold < math.inf:
        return False
    return isinstance(fault.get("drop", False), bool)


async def put_faults(request: web.Request) -> web.Response:
    """Replace the queue of canned answers for the next message sends (mark-read is exempt)."""
    state = request.app[SIM].state
    body = await read_json(request)
    responses = body.get("responses") if isinstance(body, dict) else None
    if not isinstance(responses, list) or not all(valid_fault(r) for r in responses):
        return problem(400, FAULTS_HELP)
    state.faults.clear()
    state.faults.extend(responses)
    return web.json_response({"responses": list(state.faults)})


async def delete_faults(request: web.Request) -> web.Response:
    request.app[SIM].state.faults.clear()
    return web.json_response({"responses": []})


TEMPLATE_FAULTS_HELP = (
    'expected {"responses": [{"status": 500}, {"status": 400, "code": 100}, {"delay": 5}, {"hold": 5}, '
    '{"drop": true}]}: faults for the next template-list reads (GET /{version}/{waba_id}/message_templates); '
    "async_code has no meaning there"
)


async def get_template_faults(request: web.Request) -> web.Response:
    return web.json_response({"responses": list(request.app[SIM].state.template_faults)})


async def put_template_faults(request: web.Request) -> web.Response:
    """Replace the queue of canned answers for the next template-list reads (a queue of its own,
    so a bot syncing its templates never eats the faults meant for sends, nor the other way)."""
    state = request.app[SIM].state
    body = await read_json(request)
    responses = body.get("responses") if isinstance(body, dict) else None
    if not isinstance(responses, list) or not all(valid_fault(r) and "async_code" not in r for r in responses):
        return problem(400, TEMPLATE_FAULTS_HELP)
    state.template_faults.clear()
    state.template_faults.extend(responses)
    return web.json_response({"responses": list(state.template_faults)})


async def delete_template_faults(request: web.Request) -> web.Response:
    request.app[SIM].state.template_faults.clear()
    return web.json_response({"responses": []})


async def get_config(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    return web.json_response({
        "window_errors": sim.state.window_errors,
        "statuses": list(sim.state.statuses),
        "redeliver_delays": list(sim.state.redeliver_delays),
        "phone_number_id": sim.settings.phone_number_id,
        "display_phone_number": sim.settings.display_phone_number,
        "phone_number_ids": list(sim.settings.phone_number_ids),
        "display_phone_numbers": {n: sim.settings.display_number(n) for n in sim.settings.business_numbers},
        "business_account_id": sim.settings.business_account_id,
        "bot_webhook_url": sim.settings.bot_webhook_url,
    })


async def set_config(request: web.Request) -> web.Response:
    """Change the runtime knobs (window error mode, reported statuses, redelivery) until the next reset."""
    sim = request.app[SIM]
    body = await read_json(request)
    if "window_errors" in body:
        if body["window_errors"] not in WINDOW_MODES:
            return problem(400, f"window_errors must be one of {WINDOW_MODES}")
        sim.state.window_errors = body["window_errors"]
    if "statuses" in body:
        raw = body["statuses"]
        statuses = parse_statuses(raw) if isinstance(raw, str) else tuple(raw or ())
        if any(s not in KNOWN_STATUSES for s in statuses):
            return problem(400, f"statuses must be among {KNOWN_STATUSES}")
        sim.state.statuses = statuses
    if "redeliver_delays" in body:
        raw = body["redeliver_delays"]
        try:
            delays = parse_delays(raw) if isinstance(raw, str) else tuple(raw or ())
            check_delays(delays)
        except (SettingsError, TypeError) as exc:
            return problem(400, f'redeliver_delays must be seconds >= 0 ("0.5,1,2" or a list, empty: never): {exc}')
        sim.state.redeliver_delays = delays
    return await get_config(request)


async def list_templates(request: web.Request) -> web.Response:
    return web.json_response({"templates": [template_summary(t) for t in request.app[SIM].registry.all()]})


TEMPLATE_CHANGE_HELP = (
    f'expected {{"status"?: one of {", ".join(STATUSES)}, "category"?: one of {", ".join(CATEGORIES)}, '
    f'"quality"?: one of {", ".join(QUALITIES)}, "reason"?: string}} with at least one of status, category, quality'
)


def _choice(body: Dict[str, Any], key: str, allowed: Tuple[str, ...]) -> Any:
    """`body[key]` upper-cased when it is one of `allowed`, None when absent, False when invalid."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in allowed:
        return False
    return value.upper()


async def change_template(request: web.Request) -> web.Response:
    """Meta changes a template: the registry follows (sends then fail with 132015/132016/132001)
    and the bot gets the business-account webhook of each change, signed, inline."""
    sim = request.app[SIM]
    body = await read_json(request)
    status = _choice(body, "status", STATUSES)
    category = _choice(body, "category", CATEGORIES)
    quality = _choice(body, "quality", QUALITIES)
    reason = body.get("reason")
    if False in (status, category, quality) or (status, category, quality) == (None, None, None):
        return problem(400, TEMPLATE_CHANGE_HELP)
    if reason is not None and not isinstance(reason, str):
        return problem(400, TEMPLATE_CHANGE_HELP)
    name, language = request.match_info["name"], request.match_info["language"]
    try:
        result = await sim.change_template(name, language, status=status, category=category, quality=quality, reason=reason)
    except KeyError:
        return problem(404, f"no template {name} in {language}")
    return web.json_response(result)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/_sim/health", health)
    r.add_get("/_sim/clock", get_clock)
    r.add_post("/_sim/clock", set_clock)
    r.add_post("/_sim/customers/{wa_id}/messages", customer_message)
    r.add_post("/_sim/batch", batch)
    r.add_post("/_sim/burst", burst)
    r.add_post("/_sim/webhook", raw_webhook)
    r.add_post("/_sim/verify", verify)
    r.add_get("/_sim/conversations", list_conversations)
    r.add_get("/_sim/conversations/{wa_id}", get_conversation)
    r.add_get("/_sim/conversations/{wa_id}/wait", wait_conversation)
    r.add_get("/_sim/stats", stats)
    r.add_post("/_sim/reset", reset)
    r.add_get("/_sim/faults", get_faults)
    r.add_put("/_sim/faults", put_faults)
    r.add_delete("/_sim/faults", delete_faults)
    r.add_get("/_sim/config", get_config)
    r.add_post("/_sim/config", set_config)
    r.add_get("/_sim/faults/templates", get_template_faults)
    r.add_put("/_sim/faults/templates", put_template_faults)
    r.add_delete("/_sim/faults/templates", delete_template_faults)
    r.add_get("/_sim/templates", list_templates)
    r.add_post("/_sim/templates/{name}/{language}", change_template)
