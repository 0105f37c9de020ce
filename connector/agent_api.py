"""The agent API under /webhooks/whatsapp/agent/: how a desk hands a conversation to a person,
answers the customer and hands it back, with the care window's rules and reasons.

An agent's message takes the bot's outbound path (decide, reserve, send, record), so it obeys
the same window; unlike Rasa's events API, which suppresses silently, a message that may not go
out is answered 409 with why, what would work and nothing sent. Each accepted one is stored in
the tracker as a bot utterance from an agent, so the conversation's history stays whole.
"""

import json
import logging
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from rasa.shared.core.events import BotUttered
from sanic import Blueprint, response
from sanic.request import Request
from sanic.response import HTTPResponse

from connector.care_state import OutboundRecord
from connector.conversation import history
from connector.decisions import masked
from connector.signature import same_secret
from connector.templates import InvalidTemplate, MissingParameter, parse_mapping
from connector.window import SuppressReason

logger = logging.getLogger(__name__)

TEXT_LIMIT = 4096
REASON_LIMIT = 500


class BadBody(ValueError):
    pass


def add_routes(bp: Blueprint, channel: Any) -> None:
    api = AgentApi(channel)

    @bp.middleware("request")
    async def authorised(request: Request) -> Optional[HTTPResponse]:
        if not request.path.startswith("/webhooks/whatsapp/agent/"):
            return None
        return api.refused(request)

    @bp.get("/agent/conversations")
    async def conversations(request: Request) -> HTTPResponse:
        return await api.answer(api.conversations, request)

    @bp.get("/agent/conversations/<sender_id>")
    async def conversation(request: Request, sender_id: str) -> HTTPResponse:
        return await api.answer(api.conversation, request, sender_id)

    @bp.post("/agent/conversations/<sender_id>/handoff")
    async def hand_off(request: Request, sender_id: str) -> HTTPResponse:
        return await api.answer(api.hand_off, request, sender_id)

    @bp.post("/agent/conversations/<sender_id>/messages")
    async def message(request: Request, sender_id: str) -> HTTPResponse:
        return await api.answer(api.message, request, sender_id)

    @bp.post("/agent/conversations/<sender_id>/resume")
    async def resume(request: Request, sender_id: str) -> HTTPResponse:
        return await api.answer(api.resume, request, sender_id)


class AgentApi:
    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.config = channel.config

    def refused(self, request: Request) -> Optional[HTTPResponse]:
        if not self.config.agent_token:
            return response.json({"error": "the agent API is off: set agent_token in the channel's credentials"}, status=404)
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            return response.json({"error": "Authorization: Bearer <agent_token> is required"}, status=401)
        if not same_secret(self.config.agent_token, header.removeprefix("Bearer ").strip()):
            return response.json({"error": "wrong agent token"}, status=403)
        if self.channel.state is None:
            return response.json({"error": "the channel is starting"}, status=503)
        return None

    async def answer(self, route: Callable[..., Awaitable[HTTPResponse]], request: Request, *args: Any) -> HTTPResponse:
        """A store or Rasa failure is a 503 the desk can retry, with what failed."""
        try:
            return await route(request, *args)
        except Exception as error:
            logger.exception("Agent API %s %s failed", request.method, request.path)
            return response.json({"error": f"the channel could not do it now ({type(error).__name__}: {error})"},
                                 status=503)

    # --- routes ------------------------------------------------------------------------------

    async def conversations(self, request: Request) -> HTTPResponse:
        handoffs = self.channel.handoffs
        return response.json({"now": await self.channel.clock.now(), "conversations": [
            {"sender_id": h.sender_id, "since": h.since, "reason": h.reason, "last_inbound_at": h.last_inbound_at,
             "window_expires_at": handoffs.expiry(h.last_inbound_at)}
            for h in await self.channel.state.handoffs(500)
        ]})

    async def conversation(self, request: Request, sender_id: str) -> HTTPResponse:
        return response.json(await self.view(sender_id))

    async def hand_off(self, request: Request, sender_id: str) -> HTTPResponse:
        try:
            body = _body(request, required=False)
            reason = body.pop("reason", None)
            if reason is not None and (not isinstance(reason, str) or len(reason) > REASON_LIMIT):
                raise BadBody(f"reason must be a text of up to {REASON_LIMIT} characters")
            _no_more(body)
        except BadBody as bad:
            return response.json({"error": str(bad)}, status=400)
        async with self.channel._lock(sender_id):
            changed = await self.channel.handoffs.pause(sender_id, reason or "handed off by an agent")
        logger.info("Agent API: %s %s", masked(sender_id), "handed off" if changed else "was with an agent already")
        return response.json({"sender_id": sender_id, "paused": True, "changed": changed})

    async def resume(self, request: Request, sender_id: str) -> HTTPResponse:
        agent = self.channel._agent()
        async with self.channel._lock(sender_id):
            changed = await self.channel.handoffs.resume(sender_id, agent.processor, self.channel.get_output_channel())
        return response.json({"sender_id": sender_id, "paused": False, "changed": changed})

    async def message(self, request: Request, sender_id: str) -> HTTPResponse:
        try:
            message, stored = _agent_message(_body(request, required=True))
        except BadBody as bad:
            return response.json({"error": str(bad)}, status=400)
        async with self.channel._lock(sender_id):
            record = await self.channel.outbound.deliver(sender_id, message)
            if record is not None and record.decision == "suppressed" and _code(record) == SuppressReason.STATE_UNKNOWN:
                # the state could not be read or written: worth a retry, not a 409
                return response.json({"error": "care_window_unknown", "reason": record.reason}, status=503)
            if record is None or record.decision == "suppressed":
                return response.json(await self.refusal(sender_id, record), status=409)
            if record.status == "failed":
                return response.json({"error": "send_failed", "code": record.error_code, "reason": record.reason},
                                     status=502)
            try:
                await self._remember(sender_id, stored, record)
                remembered = True
            except Exception as error:  # it went out: a 503 would have the desk send it twice
                logger.error("Agent message %s to %s sent but not stored in the tracker: %s: %s",
                             record.callback_id, masked(sender_id), type(error).__name__, error)
                remembered = False
        return response.json({"decision": record.decision, "wamid": record.wamid, "status": record.status,
                              "callback_id": record.callback_id, "in_tracker": remembered})

    # --- helpers -----------------------------------------------------------------------------

    async def _remember(self, sender_id: str, stored: Dict[str, Any], record: OutboundRecord) -> None:
        """The agent's message in the tracker, beside the bot's (Rasa's lock is held)."""
        handoffs = self.channel.handoffs
        tracker = await handoffs.tracker(sender_id)
        tracker.update(BotUttered(
            text=stored.get("text"), data={k: v for k, v in stored.items() if k != "text"},
            metadata={"whatsapp": {"agent": True, "decision": record.decision, "wamid": record.wamid,
                                   "callback_id": record.callback_id, "template": record.template}}))
        await handoffs.save(tracker)

    async def window(self, sender_id: str) -> Dict[str, Any]:
        now = await self.channel.clock.now()
        policy = self.config.care_window
        facts, _, _ = await self.channel.outbound.facts(sender_id, now, always_read_slots=True)
        is_open = facts.is_open(now, policy)
        expires_at = self.channel.handoffs.expiry(facts.last_inbound_at)
        return {
            "now": now,
            "window_open": is_open,
            "expires_at": expires_at if is_open else None,
            "expired_at": expires_at if not is_open else None,
            "opt_in": facts.opt_in,
            "templates_left": max(0, policy.templates_per_lapsed_window - facts.templates_sent),
            "templates": _template_names(self.config.templates),
        }

    async def refusal(self, sender_id: str, record: Optional[OutboundRecord]) -> Dict[str, Any]:
        window = await self.window(sender_id)
        reason = record.reason if record is not None else "nothing in the message could be sent"
        if record is not None and record.template is None and _code(record) == SuppressReason.NO_TEMPLATE:
            reason = "outside the care window: only a template can reach the customer now"
        return {"error": "care_window_closed", **{k: window[k] for k in (
            "window_open", "expired_at", "opt_in", "templates_left", "templates")}, "reason": reason}

    async def view(self, sender_id: str) -> Dict[str, Any]:
        state = self.channel.state
        window = await self.window(sender_id)
        tracker = await self.channel.handoffs.tracker(sender_id, full=True)
        records = await state.recent_outbound(sender_id, 50)
        handoff = await state.handoff(sender_id)
        paused = bool(tracker and tracker.is_paused())
        if handoff is not None and not paused:  # resumed through Rasa's own events API
            await self.channel.handoffs.ended(sender_id)
            handoff = None
        backlog = await state.desk_backlog(sender_id, 100)
        return {
            "sender_id": sender_id,
            "now": window["now"],
            "paused": paused,
            **{k: window[k] for k in ("window_open", "expires_at", "opt_in", "templates_left", "templates")},
            "expired_at": window["expired_at"],
            "handoff": {"since": handoff.since, "reason": handoff.reason} if handoff else None,
            "messages": history(tracker.events if tracker else (), records, 50),
            "desk_backlog": [{"event": e.body.get("event"), "at": e.body.get("at"), "attempts": e.attempts,
                              "error": e.error} for e in backlog],
        }


def _body(request: Request, required: bool) -> Dict[str, Any]:
    raw = request.body or b""
    if not raw.strip():
        if required:
            raise BadBody('the body must be JSON: {"text": "..."} or {"template": {...}}')
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadBody("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadBody("the body must be a JSON object")
    return body


def _no_more(body: Dict[str, Any]) -> None:
    if body:
        raise BadBody(f"{sorted(body)[0]} is unknown")


def _agent_message(body: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The bot message for the outbound path, and what the tracker keeps of it."""
    text, template = body.pop("text", None), body.pop("template", None)
    _no_more(body)
    if (text is None) == (template is None):
        raise BadBody('give either "text" or "template"')
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise BadBody("text must be a non-empty text")
        if len(text) > TEXT_LIMIT:
            raise BadBody(f"text is longer than WhatsApp's {TEXT_LIMIT} characters")
        return {"text": text, "agent": True}, {"text": text}
    try:
        mapping = parse_mapping("template", template)
        components = mapping.components({})
    except InvalidTemplate as invalid:
        raise BadBody(f"{invalid.key} {invalid.problem}") from None
    except MissingParameter as missing:
        raise BadBody(f"template parameters are values, not placeholders: {missing}") from None
    whatsapp = {"name": mapping.name, "language": {"code": mapping.language}}
    if components:
        whatsapp["components"] = [dict(c) for c in components]
    custom = {"type": "template", "template": whatsapp}
    return {"custom": custom, "agent": True}, {"custom": custom}


def _code(record: OutboundRecord) -> Optional[str]:
    """A suppression's reason code (a `SuppressReason` value, which compares equal to it), kept
    on its record."""
    return record.reason_code


def _template_names(book: Any) -> list:
    names = [mapping.name for mapping in book.by_response.values()]
    if book.fallback is not None:
        names.append(book.fallback.name)
    return list(dict.fromkeys(names))
