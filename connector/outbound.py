"""The outbound path: every bot message to a customer goes render → decide → reserve → send →
record here, and so do the fallbacks that Meta's 131047 calls for.

- The window is decided from the shared care-window state (the customer's last message, Meta's
  "closed" reports, template reservations); when the state says closed, the tracker store, the
  source of truth, is asked for the customer's last message before anything is suppressed.
- A template goes out only after a conditional write reserved one of the lapsed window's slots.
  Reserved before the send, so a crash, a timeout or a second instance never sends another.
- Every message carries its record's callback id in `biz_opaque_callback_data`, so its status
  webhooks find the record (and give it its wamid) without a second write per send. A send whose
  answer was lost stays reserved (a template) or waits a bounded time for its status (free-form)
  before it is sent again, so it is neither lost nor doubled.
- A status webhook is one write (`record_status`: its pricing and the status, one transaction
  on SQL; the record is read back only for a `failed` one).
- A `failed` status with 131047 closes the window that message answered and delivers the same
  bot message again under the closed window: its template, or a recorded suppression.
- Each decision is logged (decisions.py) and counted (metrics.py) once, as the send ended: a
  suppression with its reason code, which its record keeps (`OutboundRecord.reason_code`, stored
  with it, so the views and the agent API see it too).
"""

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Tuple

from connector.care_state import (
    SENT_STATUSES, CareState, CareStateBackend, CustomerState, OutboundRecord, Pricing, StatusWritten, unwrap,
)
from connector.care_state.records import dump_json
from connector.config import ChannelConfig
from connector.decisions import log_decision, masked, outcome
from connector.errors import (
    GraphError, MarketingStopped, OutcomeUnknown, ReEngagementRequired, TemplateUnavailable, meaning,
)
from connector.metrics import Metrics
from connector.payloads import StatusUpdate
from connector.render import Rendered, numbered_choice, render
from connector.tracker_reads import TrackerReader
from connector.template_status import NOT_SENT
from connector.templates import MissingParameter, TemplateBook
from connector.window import (
    Decision, Outbound, SendFreeForm, SendTemplate, Suppress, SuppressReason, WindowFacts, decide,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stores:
    """Resolved on each use: Rasa's agent (and its tracker store) can be replaced at run time."""

    state: CareState
    tracker_store: Any


class OutboundPath:
    def __init__(
        self,
        config: ChannelConfig,
        client: Any,
        now: Callable[[], Awaitable[float]],
        stores: Callable[[], Stores],
        opted_out: Callable[[CustomerState], bool],
        status_wait_seconds: float = 10.0,
        choices_seconds: float = 3600.0,
        meta_templates: Optional[Any] = None,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self.config = config
        self.client = client
        self.now = now
        self.stores = stores
        self.opted_out = opted_out
        """Whether an opt-out of the channel's own is not yet in the tracker store (opt_out.py)."""
        self.status_wait_seconds = status_wait_seconds
        self.choices_seconds = choices_seconds
        self.meta_templates = meta_templates
        """Which templates Meta will not send now (template_status.py); None: Meta decides at send."""
        self.metrics = metrics if metrics is not None else Metrics()

    # --- the window --------------------------------------------------------------------------

    async def facts(
        self,
        sender_id: str,
        now: float,
        in_flight_inbound_at: Optional[float] = None,
        slots: Iterable[str] = (),
        always_read_slots: bool = False,
    ) -> Tuple[WindowFacts, Dict[str, Any], Optional[CustomerState]]:
        """The window facts, and the slots asked for (read only when the window is closed, unless
        asked: the opt-in does not matter inside it). Unreadable state means "unknown": closed."""
        stores = self.stores()
        policy = self.config.care_window
        try:
            customer = await stores.state.customer(sender_id)
            facts = _facts(customer, in_flight_inbound_at)
            if facts.is_open(now, policy) and not always_read_slots:
                return facts, {}, customer
            reader = TrackerReader(unwrap(stores.tracker_store), sender_id)
            names = [self.config.opt_in_slot, *slots]
            # the rest in one worker-thread hop: the closed path costs a few queries, not a few hops
            customer, reserved, values = await stores.state.run(
                _closed_window_reads, stores.state.backend, reader, customer, in_flight_inbound_at, names)
        except Exception as error:
            logger.error("Care window state for %s unreadable: %s: %s", masked(sender_id), type(error).__name__, error)
            return WindowFacts(None, unknown=f"care window state unavailable ({type(error).__name__})"), {}, None
        facts = _facts(customer, in_flight_inbound_at)
        opt_in = values.pop(self.config.opt_in_slot, None)
        if self.opted_out(customer):
            opt_in = False
        return replace(facts, templates_sent=reserved, opt_in=opt_in if isinstance(opt_in, bool) else None), values, customer

    # --- sending -----------------------------------------------------------------------------

    async def deliver(
        self,
        sender_id: str,
        message: Dict[str, Any],
        in_flight_inbound_at: Optional[float] = None,
        phone_number_id: Optional[str] = None,
        fallback_of: Optional[str] = None,
        closed_for: Optional[float] = None,
        reply_of: Optional[Tuple[str, int]] = None,
        again: bool = False,
    ) -> Optional[OutboundRecord]:
        """One Rasa bot message, every part of it, decided against the window at send time; the
        record it ended with (an agent's message is answered with it), None if nothing was decided.

        `reply_of` (the customer message's key, the reply's number in the turn) makes the
        records' callback ids stable: when a turn runs `again`, a reply an earlier attempt
        already decided about is not sent twice."""
        rendered = render(message)
        for problem in rendered.problems:  # every part not sent is explained here
            logger.warning("Part of %s to %s not sent: %s", message.get("utter_action") or "a message", masked(sender_id), problem)
        if not rendered.messages:
            return None
        custom = message.get("custom")
        outbound = Outbound(
            response=message.get("utter_action"),
            template=custom.get("template") if isinstance(custom, dict) and custom.get("type") == "template" else None,
        )
        now = await self.now()
        # an agent's text is the agent's own words: never replaced by the fallback template
        book = replace(self.config.templates, fallback=None) if message.get("agent") else self.config.templates
        mapping = book.for_response(outbound.response) if outbound.template is None else None
        facts, slots, customer = await self.facts(
            sender_id, now, in_flight_inbound_at, slots=mapping.placeholders if mapping else ())
        if closed_for is not None:
            facts = replace(facts, closed_for_inbound=max(closed_for, facts.closed_for_inbound or 0))
        values = {**slots, **{key: value for key, value in message.items() if value is not None}}
        decision = decide(now, facts, replace(outbound, values=values), book, self.config.care_window)
        if isinstance(decision, SendTemplate):
            decision = await self._sendable(sender_id, decision, book, values)
        number = phone_number_id or (customer.reply_number if customer else None)
        if number not in self.config.phone_number_ids:  # a number this bot no longer serves
            number = None
        base = OutboundRecord(
            callback_id=f"{reply_of[0]}#{reply_of[1]}" if reply_of else "", sender_id=sender_id, decision=decision.kind, window_of=int(facts.last_inbound_at or 0),
            at=now, created_at=0.0, response=outbound.response, rendered_with=_jsonable(message), fallback_of=fallback_of,
        )
        if again and reply_of and not isinstance(decision, SendFreeForm) and await self._decided_before(_new(base)):
            return None
        if isinstance(decision, SendFreeForm):
            return await self._send_free_form(base, rendered, number, in_flight_inbound_at, again)
        if isinstance(decision, SendTemplate):
            return await self._send_template(replace(base, template=decision.name, reason=decision.stands_in), decision, number)
        return await self._suppress(base, decision.code, decision.reason)

    async def _sendable(self, sender_id: str, decision: SendTemplate, book: TemplateBook,
                        values: Dict[str, Any]) -> Decision:
        """A template Meta paused, disabled or rejected is not tried, nor a marketing template to a
        customer who stopped marketing messages: the fallback template stands in if it may go
        out, else the reply is suppressed with the reason."""
        if self.meta_templates is None:
            return decision
        try:
            known = await self.meta_templates.known()
            not_sendable = await self._not_sendable(sender_id, decision.name, decision.language, known)
            if not_sendable is None:
                return decision
            code, why = not_sendable  # the mapped template's reason, also when the fallback fails
            fallback = book.fallback
            if fallback is None or fallback.name == decision.name or \
                    await self._not_sendable(sender_id, fallback.name, fallback.language, known):
                return Suppress(code, f"outside the care window and {why}")
        except Exception as error:  # Meta still refuses what it will not send
            logger.error("Template states unreadable (%s: %s): trying %s", type(error).__name__, error, decision.name)
            return decision
        try:
            return SendTemplate(fallback.name, fallback.language, fallback.components(values), stands_in=why)
        except MissingParameter as missing:
            return Suppress(code, f"outside the care window and {why}, and the fallback template {fallback.name} cannot be filled: {missing}")

    async def _not_sendable(self, sender_id: str, name: str, language: str,
                            known: Dict[Any, Any]) -> Optional[Tuple[SuppressReason, str]]:
        template = known.get((name, language))
        if template is None:
            return None
        if template.status in NOT_SENT:
            return SuppressReason.TEMPLATE_UNAVAILABLE, f"template {name} ({language}) is {template.status} at Meta"
        if template.category == "MARKETING" and await self.stores().state.marketing_stopped(sender_id):
            return (SuppressReason.MARKETING_STOPPED,
                    f"the customer stopped marketing messages and template {name} ({language}) is MARKETING")
        return None

    async def _decided_before(self, record: OutboundRecord) -> bool:
        """This reply (part) of a turn run again: an earlier attempt decided about it (sent it,
        made it a template, suppressed it), so it is not sent twice."""
        try:
            earlier = await self.stores().state.outbound(record.callback_id)
        except Exception as error:
            logger.error("Earlier attempt of %s unreadable (sent again): %s", record.callback_id, error)
            return False
        if earlier is not None:
            logger.info("Reply %s to %s was handled by an earlier attempt of the turn: not sent again",
                        record.callback_id, masked(record.sender_id))
        return earlier is not None

    async def _send_free_form(
        self, base: OutboundRecord, rendered: Rendered, number: Optional[str], in_flight_inbound_at: Optional[float],
        again: bool = False,
    ) -> Optional[OutboundRecord]:
        state = self.stores().state
        result: Optional[OutboundRecord] = None
        for index, part in enumerate(rendered.messages):
            last = index == len(rendered.messages) - 1
            record = _new(base, index, choices=rendered.numbered_choices if last else ())
            if again and base.callback_id and await self._decided_before(record):
                continue
            await self._best_effort(state.add_outbound(record), "store the record of", record)
            try:
                wamid = await self._send_resolving_unknown(record, part, number)
            except ReEngagementRequired as error:
                # Meta disagrees that the window is open: believe Meta, then the same message
                # again under the closed window (its template, or a recorded suppression).
                await self._failed(record, error)
                await self._best_effort(state.close_window(record.sender_id, record.window_of), "close the window of", record)
                return await self.deliver(record.sender_id, dict(record.rendered_with), in_flight_inbound_at, number,
                                          fallback_of=record.callback_id, closed_for=record.window_of)
            except GraphError as error:
                return await self._failed(record, error)
            if wamid is None:  # a status webhook resolves it (or already did)
                result = replace(record, status="unknown")
                continue
            result = replace(record, wamid=wamid, status="accepted")
            self._decided(result)
        return result

    async def _send_resolving_unknown(self, record: OutboundRecord, part: Dict[str, Any], number: Optional[str]) -> Optional[str]:
        """The wamid; None when the answer was lost and the status webhooks settle it. A lost
        answer is followed by a bounded wait for the message's status, then one more send."""
        state = self.stores().state
        for attempt in (1, 2):
            try:
                wamid = await self.client.send_message(record.sender_id, part, phone_number_id=number, callback_id=record.callback_id)
            except OutcomeUnknown as error:
                await self._best_effort(state.update_outbound("unknown", callback_id=record.callback_id), "mark unknown", record)
                logger.warning("Sending %s to %s: %s", record.callback_id, masked(record.sender_id), error.message)
                status = await self._wait_for_status(record.callback_id)
                if status in SENT_STATUSES:  # Meta took it after all
                    self._decided(replace(record, status=status))
                    return None
                if status is not None:  # failed: its status webhook logs it
                    self.metrics.decided("failed")
                    return None
                if attempt == 2:
                    self._decided(replace(record, status="unknown", reason=error.message))
                    return None
                continue
            return wamid  # the record learns it from Meta's `sent` status (found by callback id)
        return None

    async def _wait_for_status(self, callback_id: str) -> Optional[str]:
        state = self.stores().state
        deadline = time.monotonic() + self.status_wait_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            try:
                record = await state.outbound(callback_id)
            except Exception:
                continue
            if record is not None and (record.status in SENT_STATUSES or record.status == "failed"):
                return record.status
        return None

    async def _send_template(self, base: OutboundRecord, decision: SendTemplate, number: Optional[str]) -> OutboundRecord:
        state = self.stores().state
        record = _new(base)
        limit = self.config.care_window.templates_per_lapsed_window
        try:
            reserved = await state.reserve_template(record, limit)
        except Exception as error:
            return await self._suppress(
                base, SuppressReason.STATE_UNKNOWN,
                f"outside the care window and the template reservation could not be written ({type(error).__name__})")
        if not reserved:
            return await self._suppress(
                base, SuppressReason.TEMPLATE_LIMIT,
                f"outside the care window and {limit} template(s) already sent since it lapsed (limit {limit})")
        try:
            wamid = await self.client.send_message(record.sender_id, decision.message(), phone_number_id=number,
                                                   callback_id=record.callback_id)
        except OutcomeUnknown as error:  # stays reserved: never sent twice; its status settles it
            await self._best_effort(state.update_outbound("unknown", callback_id=record.callback_id), "mark unknown", record)
            unknown = replace(record, status="unknown", reason=error.message)
            self._decided(unknown)
            return unknown
        except GraphError as error:  # Meta answered: it did not take the template
            await self._best_effort(state.release_template(record), "release the reservation of", record)
            if isinstance(error, TemplateUnavailable) and self.meta_templates is not None:
                await self._best_effort(self.meta_templates.refused(decision.name, decision.language, error.status),
                                        "note the template state of", record)
            return await self._failed(record, error)
        accepted = replace(record, wamid=wamid, status="accepted")
        self._decided(accepted)
        return accepted

    async def _suppress(self, base: OutboundRecord, code: SuppressReason, reason: str) -> OutboundRecord:
        record = _new(base, decision="suppressed", status="suppressed", reason=reason,
                      reason_code=SuppressReason(code).value)
        self._decided(record)  # logged and counted even when the state cannot take it
        await self._best_effort(self.stores().state.add_outbound(record), "store the suppression of", record)
        return record

    def _decided(self, record: OutboundRecord) -> None:
        """The decision's log line and its count (a suppression's with its record's code), once per decision."""
        log_decision(record)
        self.metrics.decided(outcome(record), record.reason_code)

    async def _failed(self, record: OutboundRecord, error: GraphError) -> OutboundRecord:
        reason = meaning(error.code) or error.message
        await self._meta_refused(record, error)
        await self._best_effort(
            self.stores().state.update_outbound("failed", callback_id=record.callback_id, error_code=error.code, reason=reason),
            "store the failure of", record)
        failed = replace(record, status="failed", error_code=error.code, reason=reason)
        self._decided(failed)
        return failed

    async def _meta_refused(self, record: OutboundRecord, error: Optional[GraphError]) -> None:
        """131050: the customer stopped marketing messages (utility templates still go out)."""
        if isinstance(error, MarketingStopped):
            await self._best_effort(self.stores().state.set_marketing_stopped(record.sender_id, True, await self.now()),
                                    "note the marketing stop of", record)

    async def _best_effort(self, write: Awaitable[Any], what: str, record: OutboundRecord) -> None:
        try:
            await write
        except Exception as error:
            logger.error("Could not %s %s to %s: %s: %s", what, record.callback_id, masked(record.sender_id),
                         type(error).__name__, error)

    # --- what comes back ---------------------------------------------------------------------

    async def on_status(self, status: StatusUpdate) -> None:
        """A status webhook: the record moves forward; a failure is recorded with its meaning,
        releases a template's slot, and a 131047 for a free-form message runs its fallback."""
        state = self.stores().state
        failed = status.status == "failed"
        error = GraphError.from_error_object({"code": status.errors[0].code, "message": status.errors[0].title}) \
            if failed and status.errors else None
        kwargs: Dict[str, Any] = {"callback_id": status.biz_opaque_callback_data, "wamid": status.wamid}
        if error is not None:
            kwargs.update(error_code=error.code, reason=meaning(error.code) or error.message)
        if status.status not in SENT_STATUSES and not failed:
            return  # "played" and what Meta may add later say nothing about the window
        if failed:
            logger.warning("Message %s to %s failed: code=%s %s", status.wamid, masked(status.recipient_id),
                           error.code if error else None, kwargs.get("reason"))
            for item in status.errors or (None,):
                self.metrics.graph_error(item.code if item is not None else None)
        pricing: Optional[Pricing] = None
        if status.status == "sent" and status.biz_opaque_callback_data and \
                (status.pricing_category or status.billable is not None):
            # what the message costs, for the conversation views (kept once: the later statuses repeat it)
            pricing = Pricing(status.pricing_category, status.billable, status.pricing_type)
        # the pricing and the status in one write; the record is read back only for a failure
        try:
            written = await state.record_status(status.status, pricing=pricing, fetch=failed, **kwargs)
        except Exception as problem:
            if pricing is None:
                raise
            logger.error("Pricing of %s not stored: %s: %s", status.wamid, type(problem).__name__, problem)
            written = StatusWritten(changed=False, record=await state.update_outbound(status.status, **kwargs))
        if written.first_pricing and pricing is not None and \
                (pricing.billable or (pricing.billable is None and pricing.pricing_type == "regular")):
            self.metrics.billable(pricing.category)
        record = written.record
        if record is None or not failed:
            return
        log_decision(record)
        await self._meta_refused(record, error)
        if record.decision == "template":
            await state.release_template(record)
        if isinstance(error, ReEngagementRequired) and record.decision == "free_form":
            customer = await state.customer(record.sender_id)
            if (customer.last_inbound_at or 0) > record.window_of:
                return  # the customer wrote since: that window is not the current one
            await state.close_window(record.sender_id, record.window_of)
            await self.deliver(record.sender_id, dict(record.rendered_with), phone_number_id=status.phone_number_id,
                               fallback_of=record.callback_id, closed_for=record.window_of)

    async def choice_for(self, sender_id: str, typed: str) -> Optional[str]:
        """The payload of a typed "2" if the latest bot message offered numbered options lately."""
        try:
            latest = await self.stores().state.recent_outbound(sender_id, 1)
        except Exception as error:
            logger.error("Numbered choices of %s unreadable: %s", masked(sender_id), error)
            return None
        if not latest or not latest[0].choices or time.time() - latest[0].created_at > self.choices_seconds:
            return None
        return numbered_choice(typed, latest[0].choices)


def _closed_window_reads(
    backend: CareStateBackend, reader: TrackerReader, customer: CustomerState,
    in_flight_inbound_at: Optional[float], slots: List[str],
) -> Tuple[CustomerState, int, Dict[str, Any]]:
    """Blocking. The tracker store, the source of truth, may know a later customer message than
    the state (an upgrade, or a state write that failed): then the state learns it."""
    stored = reader.last_inbound()
    if stored is not None and (customer.last_inbound_at or 0) < stored[0]:
        backend.note_inbound(customer.sender_id, int(stored[0]), stored[1])
        customer = replace(customer, last_inbound_at=int(stored[0]), reply_number=stored[1])
    window_of = int(_facts(customer, in_flight_inbound_at).last_inbound_at or 0)
    return customer, backend.templates_reserved(customer.sender_id, window_of), reader.latest_slots(slots)


def _facts(customer: CustomerState, in_flight_inbound_at: Optional[float]) -> WindowFacts:
    known = [t for t in (customer.last_inbound_at, in_flight_inbound_at) if t is not None]
    return WindowFacts(last_inbound_at=max(known) if known else None, closed_for_inbound=customer.closed_for_inbound)


def _new(base: OutboundRecord, part: int = 0, **changes: Any) -> OutboundRecord:
    """A record of its own: a stable callback id for a turn's reply (the customer message's key,
    the reply's and the part's number), else a random one."""
    callback_id = hashlib.sha256(f"{base.callback_id}#{part}".encode()).hexdigest()[:32] if base.callback_id else uuid.uuid4().hex
    return replace(base, callback_id=callback_id, created_at=time.time(), **changes)


def _jsonable(message: Dict[str, Any]) -> Dict[str, Any]:
    """The bot message as kept for a fallback: JSON values only."""
    return json.loads(dump_json(message))
