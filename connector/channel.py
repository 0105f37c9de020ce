"""The Rasa channel classes: glue between Meta's webhook, the parsers, the care window, Rasa and
the Cloud API client."""

import hmac
import json
import logging
from dataclasses import replace
from typing import Any, Awaitable, Callable, Dict, Optional, Text

from sanic import Blueprint, Sanic, response
from sanic.request import Request
from sanic.response import HTTPResponse

from rasa.core.channels.channel import InputChannel, OutputChannel, UserMessage
from rasa.shared.core.events import SlotSet

from connector.client import CloudApiClient
from connector.clock import SimulatorClock, SystemClock
from connector.config import ChannelConfig
from connector.decisions import DecisionLog
from connector.errors import GraphError, ReEngagementRequired
from connector.history import CareWindowHistory
from connector.inbound import rasa_metadata, rasa_text
from connector.ordering import PerSenderQueue
from connector.payloads import InboundMessage, MalformedWebhook, StatusUpdate, parse_webhook
from connector.render import render
from connector.signature import is_valid
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

    def __init__(self, channel: "WhatsAppInput", in_flight_inbound_at: Optional[float] = None) -> None:
        self.channel = channel
        self.in_flight_inbound_at = in_flight_inbound_at
        """WhatsApp timestamp of the message this turn answers: Rasa saves it only after the turn."""

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
        if rendered.not_rendered:
            logger.warning(
                "Not sent to %s: %s is not supported yet (response %s)",
                masked(sender_id), ", ".join(rendered.not_rendered), message.get("utter_action"),
            )
        if not rendered.messages:
            return
        custom = message.get("custom")
        outbound = Outbound(
            response=message.get("utter_action"),
            template=custom.get("template") if isinstance(custom, dict) and custom.get("type") == "template" else None,
        )
        decision, facts, now = await self._decide(sender_id, outbound, message)
        if isinstance(decision, SendFreeForm):
            try:
                for whatsapp_message in rendered.messages:
                    wamid = await channel.client.send_message(sender_id, whatsapp_message)
                    channel.decisions.add(sender_id, _record("free_form", now, facts, outbound, wamid=wamid))
                return
            except ReEngagementRequired:
                # Meta disagrees that the window is open: believe Meta, then fall back.
                await channel.record(sender_id, _record("closed", now, facts, outbound, code=131047))
                decision, facts, now = await self._decide(sender_id, outbound, message)
            except GraphError as error:
                await channel.record(sender_id, _record("failed", now, facts, outbound, code=error.code, reason=error.message))
                return
        await self._send_outside_window(sender_id, decision, facts, now, outbound)

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
        self, sender_id: str, decision: Decision, facts: WindowFacts, now: float, outbound: Outbound
    ) -> None:
        if isinstance(decision, Suppress):
            await self.channel.record(sender_id, _record("suppressed", now, facts, outbound, reason=decision.reason))
            return
        if not isinstance(decision, SendTemplate):  # a second 131047 for a free-form message
            await self.channel.record(sender_id, _record("suppressed", now, facts, outbound, reason="Meta refused it (131047)"))
            return
        try:
            wamid = await self.channel.client.send_message(sender_id, decision.message())
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
        self.client = CloudApiClient(config)
        self.clock = SimulatorClock(config.simulator_clock_url) if config.simulator_clock_url else SystemClock()
        self.history = CareWindowHistory(self._tracker_store, config.opt_in_slot)
        self.decisions = DecisionLog()
        self.turns = PerSenderQueue()
        self.app: Optional[Sanic] = None

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
            if request.args.get("hub.mode") != "subscribe" or not hmac.compare_digest(
                token.encode(), self.config.verify_token.encode()
            ):
                logger.warning("Webhook verification refused: wrong mode or verify token")
                return response.text("verification failed", status=403)
            return response.text(request.args.get("hub.challenge") or "")

        @bp.post("/webhook")
        async def receive(request: Request) -> HTTPResponse:
            self.app = request.app
            body = request.body or b""
            header = request.headers.get("x-hub-signature-256")
            if not header:
                logger.warning("Webhook refused: no X-Hub-Signature-256 header")
                return response.text("missing signature", status=401)
            if not is_valid(body, header, self.config.app_secret):
                logger.warning("Webhook refused: X-Hub-Signature-256 does not match the body")
                return response.text("invalid signature", status=403)
            try:
                webhook = parse_webhook(json.loads(body))
            except (ValueError, MalformedWebhook) as problem:
                logger.warning("Webhook refused: %s", problem)
                return response.text(f"malformed webhook: {problem}", status=400)

            for reason in webhook.skipped:
                logger.warning("Webhook item skipped: %s", reason)
            for status in webhook.statuses:
                self._handle_status(status)
            for message in webhook.messages:
                self._hand_to_rasa(message, on_new_message)
            return response.text("EVENT_RECEIVED")

        @bp.get("/conversations/<sender_id>")
        async def conversation(request: Request, sender_id: str) -> HTTPResponse:
            """The care window as the channel sees it, for agents, dashboards and custom actions."""
            token = request.args.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not self.config.api_token:
                return response.json({"error": "set api_token in the channel's credentials"}, status=404)
            if not hmac.compare_digest(token.encode(), self.config.api_token.encode()):
                return response.json({"error": "unauthorized"}, status=401)
            self.app = request.app
            return response.json(await self.window_view(sender_id))

        @bp.listener("before_server_stop")
        async def finish_turns(*_: Any) -> None:
            await self.turns.drain()

        @bp.listener("after_server_stop")
        async def close_client(*_: Any) -> None:
            await self.client.close()
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
            "recent_decisions": self.decisions.recent(sender_id),
            "counts": dict(self.decisions.counts),
        }

    def _handle_status(self, status: StatusUpdate) -> None:
        for error in status.errors:
            logger.warning(
                "Message %s to %s failed: code=%s %s", status.wamid, masked(status.recipient_id), error.code, error.title
            )
            if error.code == 131047 and status.recipient_id:
                self.turns.submit(status.recipient_id, lambda: self._window_closed_by_meta(status, 131047))
        if not status.errors:
            logger.debug("Message %s is %s", status.wamid, status.status)

    def _is_opt_out(self, message: InboundMessage) -> bool:
        said = [message.text or ""]
        if message.reply is not None:
            said += [message.reply.id, message.reply.title]
        return any(text.strip().upper() in self.config.opt_out_keywords for text in said if text)

    def _hand_to_rasa(
        self, message: InboundMessage, on_new_message: Callable[[UserMessage], Awaitable[Any]]
    ) -> None:
        text = rasa_text(message)
        if text is None:
            logger.warning(
                "Message %s (%s) from %s has no text for Rasa; recorded, not handled yet",
                message.wamid, message.type, masked(message.sender_id),
            )
            return
        self.history.saw_inbound(message.sender_id, float(message.timestamp))
        metadata = rasa_metadata(message)
        opt_out = self._is_opt_out(message)
        if opt_out:  # no NLU needed: the keyword is the customer's explicit wish
            metadata["whatsapp"]["opt_out_keyword"] = text
            text = f"/{self.config.opt_out_intent}"
        user_message = UserMessage(
            text=text,
            output_channel=WhatsAppOutput(self, in_flight_inbound_at=float(message.timestamp)),
            sender_id=message.sender_id,
            input_channel=self.name(),
            message_id=message.wamid,
            metadata=metadata,
        )

        async def turn() -> None:
            try:
                await on_new_message(user_message)
            except Exception:
                logger.exception("Rasa failed on message %s from %s", message.wamid, masked(message.sender_id))
            if opt_out:
                await self._set_opt_in(message.sender_id, False)

        self.turns.submit(message.sender_id, turn)
