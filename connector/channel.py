"""The Rasa channel classes: glue between Meta's webhook, the parsers, the care window, Rasa and
the Cloud API client."""

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Awaitable, Callable, Dict, Optional, Set, Text, Tuple

from sanic import Blueprint, Sanic, response
from sanic.request import Request
from sanic.response import HTTPResponse

from rasa.core.channels.channel import InputChannel, OutputChannel, UserMessage
from rasa.shared.core.events import SlotSet

from connector.client import CloudApiClient
from connector.clock import SimulatorClock, SystemClock
from connector.config import ChannelConfig
from connector.decisions import DecisionLog
from connector.dedup import Deduplicator, dedup_key
from connector.errors import GraphError, ReEngagementRequired
from connector.history import CareWindowHistory
from connector.inbound import rasa_metadata, rasa_text
from connector.ordering import PerSenderQueue
from connector.pacing import Pacer
from connector.payloads import (
    CallEvent,
    InboundMessage,
    MalformedWebhook,
    StatusUpdate,
    SystemChange,
    UserPreference,
    Webhook,
    parse_webhook,
)
from connector.render import numbered_choice, render
from connector.signature import is_valid, same_secret
from connector.window import Decision, Outbound, SendFreeForm, SendTemplate, Suppress, WindowFacts, decide

logger = logging.getLogger(__name__)

CHANNEL_NAME = "whatsapp"


def masked(wa_id: Optional[str]) -> str:
    """Enough of a customer's id to follow a conversation in the logs, not the phone number."""
    return f"…{wa_id[-4:]}" if wa_id else "?"


class WhatsAppOutput(OutputChannel):
    """Sends Rasa's bot messages to one customer, each decided against the care window at send
    time (a reminder reuses this object hours after it was made).

    `send_response` is the single choke point and never raises: an exception there would abort
    Rasa's turn before the tracker is saved.
    """

    @classmethod
    def name(cls) -> Text:
        return CHANNEL_NAME

    def __init__(
        self,
        channel: "WhatsAppInput",
        in_flight_inbound_at: Optional[float] = None,
        phone_number_id: Optional[str] = None,
    ) -> None:
        self.channel = channel
        self.in_flight_inbound_at = in_flight_inbound_at
        """WhatsApp timestamp of the message this turn answers: Rasa saves it only after the turn."""
        self.phone_number_id = phone_number_id
        """The business number the customer wrote to: replies leave from it."""

    async def send_response(self, recipient_id: Text, message: Dict[Text, Any]) -> None:
        try:
            await self._send(recipient_id, dict(message))
        except Exception:
            logger.exception("Sending to %s failed", masked(recipient_id))

    async def send_text_message(self, recipient_id: Text, text: Text, **kwargs: Any) -> None:
        await self.send_response(recipient_id, {"text": text})

    async def _send(self, sender_id: str, message: Dict[str, Any]) -> None:
        channel = self.channel
        rendered = render(message)
        for problem in rendered.problems:  # every part not sent is explained here
            logger.warning("Part of %s to %s not sent: %s", message.get("utter_action") or "a message", masked(sender_id), problem)
        if not rendered.messages:
            return
        custom = message.get("custom")
        outbound = Outbound(
            response=message.get("utter_action"),
            template=custom.get("template") if isinstance(custom, dict) and custom.get("type") == "template" else None,
        )
        decision, facts, now = await self._decide(sender_id, outbound, message)
        number = self.phone_number_id or channel.history.reply_number(sender_id)
        if isinstance(decision, SendFreeForm):
            try:
                for whatsapp_message in rendered.messages:
                    wamid = await channel.client.send_message(sender_id, whatsapp_message, phone_number_id=number)
                    channel.decisions.add(sender_id, _record("free_form", now, facts, outbound, wamid=wamid))
                channel.remember_choices(sender_id, rendered.numbered_choices)
                return
            except ReEngagementRequired:
                # Meta disagrees that the window is open: believe Meta, then fall back.
                await channel.record(sender_id, _record("closed", now, facts, outbound, code=131047))
                decision, facts, now = await self._decide(sender_id, outbound, message)
            except GraphError as error:
                await channel.record(sender_id, _record("failed", now, facts, outbound, code=error.code, reason=error.message))
                return
        await self._send_outside_window(sender_id, decision, facts, now, outbound, number)

    async def _decide(self, sender_id: str, outbound: Outbound, message: Dict[str, Any]):
        channel = self.channel
        now = await channel.clock.now()
        mapping = channel.config.templates.for_response(outbound.response) if outbound.template is None else None
        facts, slots = await channel.history.facts(
            sender_id, now, channel.config.care_window, self.in_flight_inbound_at,
            slots=mapping.placeholders if mapping else (),
        )
        values = {**slots, **{key: value for key, value in message.items() if value is not None}}
        decision = decide(now, facts, replace(outbound, values=values), channel.config.templates, channel.config.care_window)
        return decision, facts, now

    async def _send_outside_window(
        self, sender_id: str, decision: Decision, facts: WindowFacts, now: float, outbound: Outbound,
        number: Optional[str],
    ) -> None:
        if isinstance(decision, Suppress):
            await self.channel.record(sender_id, _record("suppressed", now, facts, outbound, reason=decision.reason))
            return
        if not isinstance(decision, SendTemplate):  # a second 131047 for a free-form message
            await self.channel.record(sender_id, _record("suppressed", now, facts, outbound, reason="Meta refused it (131047)"))
            return
        try:
            wamid = await self.channel.client.send_message(sender_id, decision.message(), phone_number_id=number)
        except GraphError as error:
            await self.channel.record(
                sender_id, _record("failed", now, facts, outbound, template=decision.name, code=error.code, reason=error.message)
            )
            return
        await self.channel.record(sender_id, _record("template", now, facts, outbound, template=decision.name, wamid=wamid))


def _record(kind: str, now: float, facts: WindowFacts, outbound: Outbound, **details: Any) -> Dict[str, Any]:
    record = {"kind": kind, "at": now, "window_of": facts.last_inbound_at, "response": outbound.response}
    record.update({key: value for key, value in details.items() if value is not None})
    return record


class WhatsAppInput(InputChannel):
    """Receives Meta's signed webhooks at /webhooks/whatsapp/webhook."""

    @classmethod
    def name(cls) -> Text:
        return CHANNEL_NAME

    @classmethod
    def from_credentials(cls, credentials: Optional[Dict[Text, Any]]) -> "WhatsAppInput":
        return cls(ChannelConfig.from_credentials(credentials))

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        pacing = dict(config.pacing)
        pacer = Pacer(**{**pacing, "customer_burst": int(pacing["customer_burst"])})
        self.client = CloudApiClient(config, pacer=pacer, retry_budget_seconds=config.retry_budget_seconds)
        self.clock = SimulatorClock(config.simulator_clock_url) if config.simulator_clock_url else SystemClock()
        self.history = CareWindowHistory(self._tracker_store, config.opt_in_slot)
        self.decisions = DecisionLog()
        self.dedup = Deduplicator(config.redis_url or None)
        self.turns = PerSenderQueue()
        self.app: Optional[Sanic] = None
        self._choices: "OrderedDict[str, Tuple[Tuple[str, str], ...]]" = OrderedDict()
        self._delivery: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        self._tasks: Set["asyncio.Task[None]"] = set()

    def remember_choices(self, sender_id: str, choices: Tuple[Tuple[str, str], ...]) -> None:
        """Options sent as numbered text, so that a typed "2" becomes its payload."""
        if choices:
            self._choices.pop(sender_id, None)
            self._choices[sender_id] = choices
            while len(self._choices) > 10_000:
                self._choices.popitem(last=False)

    def get_output_channel(self) -> WhatsAppOutput:
        """For trigger_intent and the events API: no customer message in flight."""
        return WhatsAppOutput(self)

    def _agent(self) -> Any:
        """Resolved on each use: `PUT /model` replaces the agent."""
        return getattr(self.app.ctx, "agent", None) if self.app is not None else None

    def _tracker_store(self) -> Any:
        agent = self._agent()
        return agent.tracker_store if agent is not None else None

    async def record(self, sender_id: str, record: Dict[str, Any]) -> None:
        """A decision the window depends on: logged, counted, and kept in the customer's ledger."""
        self.decisions.add(sender_id, record)
        try:
            await self.history.record(sender_id, record)
        except Exception:
            logger.exception("Could not store the care window record for %s", masked(sender_id))

    async def _outside_turn(self, sender_id: str, change: Callable[[], Awaitable[None]]) -> None:
        """Run a change to a customer's state under Rasa's lock for that customer, as Rasa's own
        HTTP API does, so no turn on any instance saves over it."""
        agent = self._agent()
        if agent is None:
            logger.error("No Rasa agent: could not update %s", masked(sender_id))
            return
        async with agent.lock_store.lock(sender_id):
            await change()

    async def _set_opt_in(self, sender_id: str, value: bool) -> None:
        async def change() -> None:
            store = self._tracker_store()
            tracker = await store.get_or_create_tracker(sender_id, append_action_listen=False)
            tracker.update(SlotSet(self.config.opt_in_slot, value))
            await store.save(tracker)
            logger.info("Customer %s opted %s", masked(sender_id), "in" if value else "out")

        await self._outside_turn(sender_id, change)

    async def _window_closed_by_meta(self, status: StatusUpdate, code: int) -> None:
        sender_id = status.recipient_id or ""

        async def change() -> None:
            now = await self.clock.now()
            facts, _ = await self.history.facts(sender_id, now, self.config.care_window)
            await self.record(sender_id, _record("closed", float(status.timestamp), facts, Outbound(None), code=code, wamid=status.wamid))

        await self._outside_turn(sender_id, change)

    def blueprint(self, on_new_message: Callable[[UserMessage], Awaitable[Any]]) -> Blueprint:
        bp = Blueprint("whatsapp_webhook", __name__)

        @bp.listener("before_server_start")
        async def remember_app(app: Sanic, _: Any) -> None:
            self.app = app

        @bp.get("/")
        async def health(_: Request) -> HTTPResponse:
            return response.json({"status": "ok"})

        @bp.get("/webhook")
        async def verify_subscription(request: Request) -> HTTPResponse:
            """Meta's handshake when the webhook URL is saved in the app dashboard."""
            token = request.args.get("hub.verify_token") or ""
            if request.args.get("hub.mode") != "subscribe" or not same_secret(self.config.verify_token, token):
                logger.warning("Webhook verification refused: wrong mode or verify token")
                return response.text("verification failed", status=403)
            return response.text(request.args.get("hub.challenge") or "")

        @bp.post("/webhook")
        async def receive(request: Request) -> HTTPResponse:
            self.app = request.app
            body = request.body or b""
            if len(body) > self.config.max_body_bytes:
                logger.warning("Webhook refused: %d bytes is over max_body_bytes", len(body))
                return response.text("payload too large", status=413)
            header = request.headers.get("x-hub-signature-256")
            if not header:
                logger.warning("Webhook refused: no X-Hub-Signature-256 header")
                return response.text("missing signature", status=401)
            if not is_valid(body, header, self.config.app_secret):
                logger.warning("Webhook refused: X-Hub-Signature-256 does not match the body")
                return response.text("invalid signature", status=403)
            try:
                webhook = parse_webhook(json.loads(body))
            except RecursionError:  # nesting deeper than the parser's stack
                logger.warning("Webhook refused: JSON nested too deeply")
                return response.text("malformed webhook: JSON nested too deeply", status=400)
            except (ValueError, MalformedWebhook) as problem:
                logger.warning("Webhook refused: %s", problem)
                return response.text(f"malformed webhook: {problem}", status=400)

            await self._dispatch(webhook, on_new_message)
            return response.text("EVENT_RECEIVED")

        @bp.get("/conversations/<sender_id>")
        async def conversation(request: Request, sender_id: str) -> HTTPResponse:
            """The care window as the channel sees it, for agents, dashboards and custom actions."""
            token = request.args.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not self.config.api_token:
                return response.json({"error": "set api_token in the channel's credentials"}, status=404)
            if not same_secret(self.config.api_token, token):
                return response.json({"error": "unauthorized"}, status=401)
            self.app = request.app
            return response.json(await self.window_view(sender_id))

        @bp.listener("before_server_stop")
        async def finish_turns(*_: Any) -> None:
            await self.turns.drain()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        @bp.listener("after_server_stop")
        async def close_client(*_: Any) -> None:
            await self.client.close()
            await self.dedup.close()
            if isinstance(self.clock, SimulatorClock):
                await self.clock.close()

        return bp

    async def window_view(self, sender_id: str) -> Dict[str, Any]:
        now = await self.clock.now()
        policy = self.config.care_window
        facts, _ = await self.history.facts(sender_id, now, policy, read_slots_when_open=True)
        is_open = facts.is_open(now, policy)
        expires_at = facts.expires_at(now)
        return {
            "sender_id": sender_id,
            "now": now,
            "window_open": is_open,
            "last_inbound_at": facts.last_inbound_at,
            "expires_at": expires_at - policy.margin_seconds if is_open and expires_at else None,
            "margin_seconds": policy.margin_seconds,
            "closed_by_meta_at": facts.closed_at,
            "opt_in": facts.opt_in,
            "templates_sent": facts.templates_sent,
            "templates_left": 0 if is_open else max(0, policy.templates_per_lapsed_window - facts.templates_sent),
            "unknown": facts.unknown,
            "records": await self.history.records(sender_id),
            "recent_decisions": [
                {**record, "delivery": self._delivery.get(record.get("wamid", ""))}
                for record in self.decisions.recent(sender_id)
            ],
            "counts": dict(self.decisions.counts),
        }

    async def _dispatch(self, webhook: Webhook, on_new_message: Callable[[UserMessage], Awaitable[Any]]) -> None:
        """Every item once (Meta delivers at least once, for days), then to its handler."""
        for reason in webhook.skipped:
            logger.warning("Webhook item skipped: %s", reason)
        for error in webhook.errors:
            logger.warning("Meta reports error code=%s %s: %s", error.code, error.title, error.details)
        for notice in webhook.notices:
            logger.info("Meta notice %s: %s", notice.field, notice.event)
        for item in webhook.in_order:
            if not await self.dedup.first_time(dedup_key(item)):
                logger.info("Duplicate %s %s ignored", type(item).__name__, dedup_key(item).split(":")[1][-12:])
            elif isinstance(item, StatusUpdate):
                self._handle_status(item)
            elif isinstance(item, InboundMessage):
                self._hand_to_rasa(item, on_new_message)
            elif isinstance(item, CallEvent):
                self._handle_call(item, on_new_message)
            elif isinstance(item, SystemChange):
                self._handle_system_change(item)
            elif isinstance(item, UserPreference):
                self._handle_preference(item)

    def _handle_status(self, status: StatusUpdate) -> None:
        self._delivery.pop(status.wamid, None)
        self._delivery[status.wamid] = {
            "status": status.status,
            "timestamp": status.timestamp,
            "errors": [{"code": e.code, "title": e.title} for e in status.errors],
        }
        while len(self._delivery) > 50_000:
            self._delivery.popitem(last=False)
        for error in status.errors:
            logger.warning(
                "Message %s to %s failed: code=%s %s", status.wamid, masked(status.recipient_id), error.code, error.title
            )
            if error.code == 131047 and status.recipient_id:
                self.turns.submit(status.recipient_id, lambda: self._window_closed_by_meta(status, 131047))
        if not status.errors:
            logger.debug("Message %s is %s", status.wamid, status.status)

    def _handle_call(self, call: CallEvent, on_new_message: Callable[[UserMessage], Awaitable[Any]]) -> None:
        """A customer's call restarts the care window: it reaches Rasa as `call_intent`, with
        the call's WhatsApp timestamp, like a message."""
        logger.info("Call %s %s from %s (%s)", call.call_id[-8:], call.event, masked(call.sender_id), call.direction)
        if not (call.customer_initiated and call.event == "connect" and self.config.call_intent and call.sender_id):
            return
        metadata = {"whatsapp": {
            "type": "call", "call_id": call.call_id, "timestamp": call.timestamp,
            "phone_number_id": call.phone_number_id, "wa_id": call.wa_id, "user_id": call.user_id,
            "profile_name": call.profile_name,
        }}
        self._submit_turn(call.sender_id, self.config.call_intent, f"call.{call.call_id}", metadata,
                          float(call.timestamp), call.phone_number_id, on_new_message)

    def _handle_system_change(self, change: SystemChange) -> None:
        """A changed number or id: both conversations point at each other, so the customer's
        history stays findable from either."""
        logger.info("Customer %s is now %s (%s)", masked(change.old_sender_id), masked(change.new_sender_id), change.type)
        if not change.old_sender_id or not change.new_sender_id:
            return
        for sender_id, key, other in ((change.old_sender_id, "now", change.new_sender_id),
                                      (change.new_sender_id, "previously", change.old_sender_id)):
            record = {"kind": "identity_changed", "at": float(change.timestamp), "window_of": None,
                      "change": change.type, key: other}
            self.turns.submit(sender_id, lambda s=sender_id, r=record: self._outside_turn(s, lambda: self.record(s, r)))

    def _handle_preference(self, preference: UserPreference) -> None:
        """Meta's "stop marketing messages" from the customer: honoured as an opt-out."""
        logger.info("Customer %s: %s %s", masked(preference.sender_id), preference.category, preference.value)
        if preference.value == "stop" and preference.sender_id:
            self.turns.submit(preference.sender_id, lambda: self._set_opt_in(preference.sender_id, False))

    def _is_opt_out(self, message: InboundMessage) -> bool:
        said = [message.text or ""]
        if message.reply is not None:
            said += [message.reply.id, message.reply.title]
        return any(text.strip().upper() in self.config.opt_out_keywords for text in said if text)

    def _hand_to_rasa(
        self, message: InboundMessage, on_new_message: Callable[[UserMessage], Awaitable[Any]]
    ) -> None:
        text = rasa_text(message, self.config.inbound)
        if text is None:
            errors = ", ".join(f"code={e.code} {e.title}" for e in message.errors)
            logger.log(
                logging.WARNING if errors else logging.INFO,
                "Message %s (%s) from %s recorded, not for Rasa%s",
                message.wamid, message.type, masked(message.sender_id), f": {errors}" if errors else "",
            )
            return
        metadata = rasa_metadata(message)
        choice = numbered_choice(text, self._choices.get(message.sender_id, ()))
        if choice is not None:
            metadata["whatsapp"]["typed"] = text
            text = choice
        elif self._is_opt_out(message):  # no NLU needed: the keyword is the customer's explicit wish
            metadata["whatsapp"]["opt_out_keyword"] = text
            text = f"/{self.config.opt_out_intent}"
        self._submit_turn(message.sender_id, text, message.wamid, metadata, float(message.timestamp),
                          message.phone_number_id, on_new_message)

    async def _mark_read(self, wamid: str, phone_number_id: str) -> None:
        """Blue ticks, and "typing…" while Rasa works; beside the turn, never holding it up."""
        try:
            await self.client.mark_read(wamid, self.config.typing_indicator, phone_number_id)
        except GraphError as error:
            logger.info("Could not mark %s read: code=%s %s", wamid, error.code, error.message)

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _submit_turn(
        self, sender_id: str, text: str, message_id: str, metadata: Dict[str, Any], timestamp: float,
        phone_number_id: str, on_new_message: Callable[[UserMessage], Awaitable[Any]],
    ) -> None:
        self.history.saw_inbound(sender_id, timestamp, phone_number_id)
        user_message = UserMessage(
            text=text,
            output_channel=WhatsAppOutput(self, in_flight_inbound_at=timestamp, phone_number_id=phone_number_id),
            sender_id=sender_id,
            input_channel=self.name(),
            message_id=message_id,
            metadata=metadata,
        )
        opt_out = "opt_out_keyword" in metadata["whatsapp"]

        async def turn() -> None:
            if self.config.mark_read and metadata["whatsapp"].get("type") != "call":
                self._background(self._mark_read(message_id, phone_number_id))
            try:
                await on_new_message(user_message)
            except Exception:
                logger.exception("Rasa failed on message %s from %s", message_id, masked(sender_id))
            if opt_out:
                await self._set_opt_in(sender_id, False)

        self.turns.submit(sender_id, turn)
