"""The Rasa channel classes: glue between Meta's webhook, the parsers, the care window, Rasa and
the Cloud API client."""

import asyncio
import functools
import gc
import json
import logging
import socket
import time
from collections import Counter
from typing import Any, Awaitable, Callable, Dict, Optional, Set, Text

from sanic import Blueprint, Sanic, response
from sanic.request import Request
from sanic.response import HTTPResponse

from rasa.core.channels.channel import InputChannel, OutputChannel, UserMessage

from connector.action_guard import guard, in_channel_turn
from connector.agent_api import add_routes as add_agent_routes
from connector.care_state import CareState, PendingTurn, backend_for, unwrap
from connector.client import CloudApiClient
from connector.clock import SimulatorClock, SystemClock
from connector.config import ChannelConfig
from connector.decisions import masked, outcome
from connector.desk import Desk
from connector.errors import GraphError
from connector.handoff import Handoffs, install as install_handoffs
from connector.inbound import rasa_metadata, rasa_text
from connector.intake import Busy, Intake
from connector.loop_watch import LoopWatch
from connector.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from connector.opt_out import OptOuts
from connector.ordering import PerSenderQueue
from connector.outbound import OutboundPath, Stores
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
from connector.render import looks_like_a_choice
from connector.signature import is_valid, same_secret
from connector.template_status import MetaTemplates
from connector.tracker_reads import TrackerReader

logger = logging.getLogger(__name__)

CHANNEL_NAME = "whatsapp"


def freeze_startup_heap() -> None:
    """Rasa's loaded model is about half a million objects that live as long as the process, and
    every full garbage collection walked them all: 270-297 ms with the whole process stopped, a
    few times a minute under load. Frozen, a collection walks only what came after. Process-wide,
    and once: frozen objects are still freed by reference counting; only a cycle among them (an
    agent replaced by `PUT /model`) is never collected."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
        logger.info("Froze %d objects of the loaded model out of the garbage collector's full collections "
                    "(freeze_startup_heap)", gc.get_freeze_count())


class WhatsAppOutput(OutputChannel):
    """Sends Rasa's bot messages to one customer through the outbound path, each decided against
    the care window at send time (a reminder reuses this object hours after it was made).

    `send_response` is the single choke point and never raises: an exception there would abort
    Rasa's turn before the tracker is saved.
    """

    @classmethod
    def name(cls) -> Text:
        return CHANNEL_NAME

    def __init__(self, channel: "WhatsAppInput", turn: Optional[PendingTurn] = None, again: bool = False) -> None:
        self.channel = channel
        self.turn = turn
        """The customer message this turn answers (none for reminders and the HTTP API)."""
        self.again = again
        """An earlier attempt of this turn may have sent some of its replies: those are not resent."""
        self._replies = 0

    async def send_response(self, recipient_id: Text, message: Dict[Text, Any]) -> None:
        turn, self._replies = self.turn, self._replies + 1
        try:
            await self.channel.until_ready()  # Rasa answers its HTTP API before the state is open
            await self.channel.outbound.deliver(
                recipient_id, dict(message),
                in_flight_inbound_at=float(turn.timestamp) if turn else None,  # Rasa saves it after the turn
                phone_number_id=turn.phone_number_id if turn else None,
                reply_of=(turn.key, self._replies) if turn else None, again=self.again)
        except Exception:
            logger.exception("Sending to %s failed", masked(recipient_id))

    async def send_text_message(self, recipient_id: Text, text: Text, **kwargs: Any) -> None:
        await self.send_response(recipient_id, {"text": text})


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
        self.metrics = Metrics()
        """This channel's Prometheus metrics (a registry of its own), at GET /webhooks/whatsapp/metrics."""
        self.loop_watch = LoopWatch()
        self.metrics.watch_loop(lambda: self.loop_watch.longest)
        self.client = CloudApiClient(config, pacer=pacer, retry_budget_seconds=config.retry_budget_seconds,
                                     metrics=self.metrics)
        self.clock = SimulatorClock(config.simulator_clock_url) if config.simulator_clock_url else SystemClock()
        self._clock_follower: Optional["asyncio.Task[None]"] = None
        self.turns = PerSenderQueue()
        self.state: Optional[CareState] = None
        """Made at startup from Rasa's tracker store (see `open_state`)."""
        self.opt_outs = OptOuts(config.opt_in_slot, self._stores, self._lock)
        self.meta_templates = MetaTemplates(config, self.client, lambda: self._stores().state, self.clock.now)
        self.outbound = OutboundPath(config, self.client, self.clock.now, self._stores, self.opt_outs.counts_as_opted_out,
                                     meta_templates=self.meta_templates, metrics=self.metrics)
        self.intake = Intake(lambda: self._stores().state, self.turns, self._run_turn, self._already_saved,
                             max_in_flight=config.max_in_flight, attempts=config.turn_attempts, metrics=self.metrics)
        self.desk = Desk(config.handoff_webhook_url, config.agent_token, lambda: self._stores().state, self.clock.now,
                         config.desk_backlog_limit)
        self.handoffs = Handoffs(config, self._stores, self.clock.now, self.desk)
        self.app: Optional[Sanic] = None
        self._on_new_message: Optional[Callable[[UserMessage], Awaitable[Any]]] = None
        self._ready = asyncio.Event()
        self._tasks: Set["asyncio.Task[None]"] = set()
        self.refused = 0
        """Webhooks answered 503 since start (full, shutting down, inbox not writable)."""
        self.other_numbers: Counter = Counter()
        """Webhook items for business numbers this bot does not serve, by number."""

    async def until_ready(self, timeout: float = 30.0) -> None:
        """Until the state is open: `after_server_start` opens it after Rasa is already serving."""
        if not self._ready.is_set():
            await asyncio.wait_for(self._ready.wait(), timeout)

    def get_output_channel(self) -> WhatsAppOutput:
        """For trigger_intent and the events API: no customer message in flight."""
        return WhatsAppOutput(self)

    def _agent(self) -> Any:
        """Resolved on each use: `PUT /model` replaces the agent."""
        return getattr(self.app.ctx, "agent", None) if self.app is not None else None

    def _stores(self) -> Stores:
        agent = self._agent()
        if self.state is None or agent is None:
            raise RuntimeError("the WhatsApp channel's state is not open yet (the server is starting)")
        return Stores(self.state, agent.tracker_store)

    def _lock(self, sender_id: str) -> Any:
        """Rasa's lock for the customer, as Rasa's own HTTP API takes it for changes outside a turn."""
        return self._agent().lock_store.lock(sender_id)

    async def open_state(self, app: Sanic) -> None:
        """The care-window state, with Rasa's tracker store, its schema created before any webhook
        is handled. A store it cannot live with, or tables it cannot create, stop the server."""
        self.app = app
        agent = self._agent()
        if agent is None:
            raise RuntimeError("the WhatsApp channel found no Rasa agent at startup")
        state = CareState(backend_for(agent.tracker_store))
        await state.create_schema()
        self.state = state
        await self.meta_templates.start()  # a mapping that cannot work stops the server here
        owner = f"{socket.gethostname()}:{app.state.port}"
        install_handoffs(self.handoffs)
        await self.intake.start(owner)
        self.desk.start(owner)
        self.handoffs.start()
        if isinstance(self.clock, SimulatorClock):  # time travel: reminders follow the simulator's jumps
            self._clock_follower = asyncio.get_running_loop().create_task(self.clock.follow())
        if self.config.freeze_startup_heap:
            freeze_startup_heap()
        self._ready.set()
        self.loop_watch.start()  # from here: the start-up's own blocking work is not a stall of serving
        logger.info("WhatsApp care-window state and inbox: %s; this instance is %s", type(state.backend).__name__, owner)

    def blueprint(self, on_new_message: Callable[[UserMessage], Awaitable[Any]]) -> Blueprint:
        self._on_new_message = on_new_message
        bp = Blueprint("whatsapp_webhook", __name__)

        @bp.listener("before_server_start")
        async def remember_app(app: Sanic, _: Any) -> None:
            self.app = app

        @bp.listener("after_server_start")  # Rasa loads its agent (and tracker store) before this
        async def open_state(app: Sanic, _: Any) -> None:
            await self.open_state(app)

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
        @self._timed
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
            try:
                await self.until_ready(timeout=10)
            except asyncio.TimeoutError:  # Meta redelivers later
                return self._refuse("starting")
            return await self._dispatch(webhook)

        @bp.get("/conversations/<sender_id>")
        async def conversation(request: Request, sender_id: str) -> HTTPResponse:
            """The care window as the channel sees it, for agents, dashboards and custom actions."""
            if not self.config.api_token:
                return response.json({"error": "set api_token in the channel's credentials"}, status=404)
            if not same_secret(self.config.api_token, self._token(request)):
                return response.json({"error": "unauthorized"}, status=401)
            self.app = request.app
            return response.json(await self.window_view(sender_id))

        @bp.get("/metrics")
        async def metrics(request: Request) -> HTTPResponse:
            """Prometheus metrics of this instance, behind the same token as the conversation view."""
            if not self.config.api_token:
                return response.json({"error": "set api_token in the channel's credentials"}, status=404)
            if not same_secret(self.config.api_token, self._token(request)):
                return response.json({"error": "unauthorized"}, status=401)
            return HTTPResponse(self.metrics.exposition(), content_type=METRICS_CONTENT_TYPE)

        @bp.get("/intake")
        async def intake(request: Request) -> HTTPResponse:
            """What this instance holds and has refused: for operators and load tests."""
            if not self.config.api_token:
                return response.json({"error": "set api_token in the channel's credentials"}, status=404)
            if not same_secret(self.config.api_token, self._token(request)):
                return response.json({"error": "unauthorized"}, status=401)
            try:
                since = float(request.args["stall_since"][0]) if "stall_since" in request.args else None
            except ValueError:
                return response.json({"error": "stall_since must be epoch seconds"}, status=400)
            return response.json({
                "longest_loop_stall_ms": round(self.loop_watch.longest_since(since) * 1000, 1),
                "instance": self.intake.owner, "in_flight": self.intake.in_flight,
                "max_in_flight": self.intake.max_in_flight, "stopping": self.intake.stopping,
                "failed_turns": self.intake.failed, "refused_webhooks": self.refused,
                "other_numbers": dict(self.other_numbers),
            })

        add_agent_routes(bp, self)

        @bp.listener("before_server_stop")  # the server still listens: new webhooks get 503
        async def finish_turns(*_: Any) -> None:
            await self.intake.stop(self.config.shutdown_deadline_seconds)
            await self.handoffs.stop()
            await self.desk.stop()
            await self.meta_templates.stop()
            if self._tasks:  # read receipts still on the wire
                await asyncio.wait(self._tasks, timeout=2)
            self.opt_outs.close()

        @bp.listener("after_server_stop")
        async def close_client(*_: Any) -> None:
            await self.client.close()
            await self.loop_watch.stop()
            if self._clock_follower is not None:
                self._clock_follower.cancel()
            if isinstance(self.clock, SimulatorClock):
                await self.clock.close()
            if self.state is not None:
                self.state.close()

        return bp

    async def window_view(self, sender_id: str) -> Dict[str, Any]:
        """One customer's care window, decisions and inbox as this channel sees them. Times are the
        channel's clock in epoch seconds, each with an ISO 8601 UTC twin (`now_iso`, `at_iso`, ...).

        `templates_left` is what the window's allowance still holds: inside the window the templates
        that may go out once it lapses (`templates_per_lapsed_window` unless the clock was turned
        back after one went out for this very window), outside it those that may go out now."""
        from datetime import datetime, timezone

        def iso(ts: Optional[float]) -> Optional[str]:
            if ts is None:
                return None
            return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

        now = await self.clock.now()
        policy = self.config.care_window
        facts, _, customer = await self.outbound.facts(sender_id, now, always_read_slots=True)
        is_open = facts.is_open(now, policy)
        expires_at = facts.expires_at(now)
        expires_at = expires_at - policy.margin_seconds if is_open and expires_at else None
        try:
            records = await self.state.recent_outbound(sender_id, 50)
            inbox = await self.state.turns_of(sender_id, 20)
            pricing = await self.state.pricing_of([r.callback_id for r in records])
            marketing_stopped: Optional[bool] = await self.state.marketing_stopped(sender_id)
        except Exception as error:  # the window says "unknown" already; show what can be shown
            logger.error("Records of %s unreadable: %s", masked(sender_id), error)
            records, inbox, pricing, marketing_stopped = [], [], {}, None
        return {
            "sender_id": sender_id,
            "now": now,
            "now_iso": iso(now),
            "window_open": is_open,
            "last_inbound_at": facts.last_inbound_at,
            "last_inbound_at_iso": iso(facts.last_inbound_at),
            "expires_at": expires_at,
            "expires_at_iso": iso(expires_at),
            "margin_seconds": policy.margin_seconds,
            "closed_by_meta_for": facts.closed_for_inbound,
            "opt_in": facts.opt_in,
            "marketing_stopped": marketing_stopped,
            "templates_sent": facts.templates_sent,
            "templates_left": max(0, policy.templates_per_lapsed_window - facts.templates_sent),
            "reply_number": customer.reply_number if customer else None,
            "unknown": facts.unknown,
            "records": [
                {"kind": outcome(r), "decision": r.decision, "status": r.status, "at": r.at, "at_iso": iso(r.at),
                 "window_of": r.window_of, "response": r.response, "template": r.template,
                 "text": (r.rendered_with or {}).get("text"), "wamid": r.wamid,
                 "callback_id": r.callback_id, "code": r.error_code, "reason": r.reason, "reason_code": r.reason_code, "fallback_of": r.fallback_of,
                 "pricing_category": pricing[r.callback_id].category if r.callback_id in pricing else None,
                 "billable": pricing[r.callback_id].billable if r.callback_id in pricing else None}
                for r in reversed(records)
            ],
            "inbox": [
                {"message_id": t.key, "state": t.state, "attempts": t.attempts, "error": t.error,
                 "received_at": t.received_at, "received_at_iso": iso(t.received_at), "text": t.text}
                for t in reversed(inbox)
            ],
        }

    @staticmethod
    def _token(request: Request) -> str:
        return request.args.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ")

    def _refuse(self, why: str) -> HTTPResponse:
        self.refused += 1
        logger.warning("Webhook refused with 503 (Meta delivers it again later): %s", why)
        return response.text(why, status=503)

    def _timed(self, handler: Callable[[Request], Awaitable[HTTPResponse]]) -> Callable[[Request], Awaitable[HTTPResponse]]:
        """The webhook handler, its time from the request's arrival to the answer measured."""

        @functools.wraps(handler)
        async def timed(request: Request) -> HTTPResponse:
            started = time.perf_counter()
            try:
                return await handler(request)
            finally:
                self.metrics.webhook_acked(time.perf_counter() - started)

        return timed

    async def _dispatch(self, webhook: Webhook) -> HTTPResponse:
        """The customer's messages into the inbox, all or none, before the 200; then the rest.
        Meta delivers at least once: the inbox knows what was done, and the rest is idempotent."""
        for reason in webhook.skipped:
            logger.warning("Webhook item skipped: %s", reason)
        for error in webhook.errors:
            logger.warning("Meta reports error code=%s %s: %s", error.code, error.title, error.details)
        for notice in webhook.notices:
            logger.info("Meta notice %s: %s", notice.field, notice.event)
            self._background(self._on_notice(notice))
        items = [item for item in webhook.in_order if self._serves(item.phone_number_id)]
        turns = [turn for turn in map(self._turn_for, items) if turn is not None]
        try:
            accepted = set(await self.intake.accept(turns))
        except Busy as busy:
            return self._refuse(str(busy))
        except Exception as error:
            return self._refuse(f"the inbox could not be written ({type(error).__name__}: {error})")
        for turn in turns:
            if turn.key in accepted:
                self.metrics.inbound(turn.metadata["whatsapp"].get("type"))
            else:
                self.metrics.duplicate()
                logger.info("Message %s of %s delivered again: done or being handled, not handled twice",
                            turn.key, masked(turn.sender_id))
        for item in items:
            if isinstance(item, StatusUpdate):
                self._handle_status(item)
            elif isinstance(item, CallEvent):
                logger.info("Call %s %s from %s (%s)", item.call_id[-8:], item.event, masked(item.sender_id), item.direction)
            elif isinstance(item, SystemChange):
                self._handle_system_change(item)
            elif isinstance(item, UserPreference):
                self._handle_preference(item)
        return response.text("EVENT_RECEIVED")

    async def _on_notice(self, notice: Any) -> None:
        try:
            await self.meta_templates.on_notice(notice)
        except Exception as error:  # the next sync brings the state up to date
            logger.error("Template webhook %s not recorded: %s: %s", notice.field, type(error).__name__, error)

    def _serves(self, phone_number_id: str) -> bool:
        """An app is often subscribed for several numbers, served by other bots: theirs are not ours."""
        if phone_number_id in self.config.phone_number_ids:
            return True
        if not self.other_numbers[phone_number_id]:
            logger.warning("Webhook items for business number %s are ignored: this bot serves %s (phone_number_id)",
                           phone_number_id, ", ".join(self.config.phone_number_ids))
        self.other_numbers[phone_number_id] += 1
        return False

    def _turn_for(self, item: Any) -> Optional[PendingTurn]:
        if isinstance(item, InboundMessage):
            return self._turn_for_message(item)
        if isinstance(item, CallEvent):
            return self._turn_for_call(item)
        return None

    def _handle_status(self, status: StatusUpdate) -> None:
        """In the customer's order, beside their turns: a 131047 fallback must not overtake them."""
        logger.debug("Message %s is %s", status.wamid, status.status)
        self.turns.submit(status.recipient_id or status.recipient_user_id or status.wamid,
                          lambda: self.outbound.on_status(status))

    def _turn_for_call(self, call: CallEvent) -> Optional[PendingTurn]:
        """A customer's call restarts the care window: it reaches Rasa as `call_intent`, with
        the call's WhatsApp timestamp, like a message."""
        if not (call.customer_initiated and call.event == "connect" and self.config.call_intent and call.sender_id):
            return None
        metadata = {"whatsapp": {
            "type": "call", "call_id": call.call_id, "timestamp": call.timestamp,
            "phone_number_id": call.phone_number_id, "wa_id": call.wa_id, "user_id": call.user_id,
            "profile_name": call.profile_name,
        }}
        return PendingTurn(f"call.{call.call_id}", call.sender_id, self.config.call_intent, metadata,
                           int(call.timestamp), call.phone_number_id, time.time())

    def _handle_system_change(self, change: SystemChange) -> None:
        """A changed number or id: logged so the two conversations can be tied together. The new
        number's window opens with its first message, as Meta's does."""
        logger.info("Customer %s is now %s (%s)", masked(change.old_sender_id), masked(change.new_sender_id), change.type)

    def _handle_preference(self, preference: UserPreference) -> None:
        """Meta's "stop marketing messages" (or "resume"): marketing templates are not sent to
        them from now on, utility templates still are."""
        logger.info("Customer %s: %s %s", masked(preference.sender_id), preference.category, preference.value)
        if preference.category == "marketing_messages" and preference.value in ("stop", "resume") and preference.sender_id:
            self.turns.submit(preference.sender_id, lambda: self._marketing(preference))

    async def _marketing(self, preference: UserPreference) -> None:
        try:
            await self.state.set_marketing_stopped(preference.sender_id, preference.value == "stop",
                                                   float(preference.timestamp))
        except Exception as error:  # Meta answers 131050 to a marketing template meanwhile: noted then
            logger.error("Marketing %s of %s not stored: %s: %s", preference.value, masked(preference.sender_id),
                         type(error).__name__, error)

    def _is_opt_out(self, message: InboundMessage) -> bool:
        said = [message.text or ""]
        if message.reply is not None:
            said += [message.reply.id, message.reply.title]
        return any(text.strip().upper() in self.config.opt_out_keywords for text in said if text)

    def _turn_for_message(self, message: InboundMessage) -> Optional[PendingTurn]:
        text = rasa_text(message, self.config.inbound)
        if text is None:
            errors = ", ".join(f"code={e.code} {e.title}" for e in message.errors)
            logger.log(
                logging.WARNING if errors else logging.INFO,
                "Message %s (%s) from %s recorded, not for Rasa%s",
                message.wamid, message.type, masked(message.sender_id), f": {errors}" if errors else "",
            )
            return None
        metadata = rasa_metadata(message)
        if self._is_opt_out(message):  # no NLU needed: the keyword is the customer's explicit wish
            metadata["whatsapp"]["opt_out_keyword"] = text
            text = f"/{self.config.opt_out_intent}"
        return PendingTurn(message.wamid, message.sender_id, text, metadata, int(message.timestamp),
                           message.phone_number_id, time.time())

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

    async def _run_turn(self, turn: PendingTurn, again: bool) -> None:
        """One attempt at the turn (the intake retries it); raises if Rasa did not save it."""
        whatsapp = dict(turn.metadata["whatsapp"])
        if self.config.mark_read and not again and whatsapp.get("type") != "call":
            self._background(self._mark_read(turn.key, turn.phone_number_id))
        said = turn.text
        choice = await self.outbound.choice_for(turn.sender_id, said) if looks_like_a_choice(said) else None
        if choice is not None:  # a typed "2" for the latest numbered options
            whatsapp["typed"] = said
            said = choice
        if "opt_out_keyword" in whatsapp:  # stored before the bot confirms it
            await self.opt_outs.opt_out(turn.sender_id, "keyword")
        agent = self._agent()
        guard(agent)
        user_message = UserMessage(
            text=said,
            output_channel=WhatsAppOutput(self, turn, again),
            sender_id=turn.sender_id,
            input_channel=self.name(),
            message_id=turn.key,
            metadata={**turn.metadata, "whatsapp": whatsapp},
        )
        marker = in_channel_turn.set(True)
        try:
            await self._on_new_message(user_message)
        finally:
            in_channel_turn.reset(marker)

    async def _already_saved(self, turn: PendingTurn) -> bool:
        stores = self._stores()
        reader = TrackerReader(unwrap(stores.tracker_store), turn.sender_id)
        return await stores.state.run(reader.has_message, turn.key)
