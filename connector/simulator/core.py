"""The simulator's behaviour, independent of HTTP routing: sending as the Cloud API would accept it,
and playing customers to the bot.

Handlers in `cloud_api.py` and `control_api.py` only translate requests to these calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Tuple

from aiohttp import web

from . import payloads
from .delivery import BotUnreachable, WebhookDelivery, encode, taken
from .errors import GraphError, webhook_error
from .render import describe
from .settings import Settings
from .state import WINDOW_SECONDS, Conversation, Record, SimState
from .templates import DEFAULT_GRAPH_FIELDS, GRAPH_FIELDS, Page, PagingError, Template, TemplateRegistry, page
from .validate import is_mark_read, recipient_of, validate_send

log = logging.getLogger("connector.simulator")

BSUID = re.compile(r"^[A-Z]{2}\.")
PLACEHOLDER_MEDIA = b"simulated media content\n"
TEMPLATE_PAGE_DEFAULT = 25
TEMPLATE_PAGE_MAX = 100  # a larger `limit` is capped, as Graph caps page sizes


def api_version(version: str) -> float:
    try:
        return float(version.lstrip("vV"))
    except ValueError:
        return 0.0


class DropConnection(web.HTTPException):
    """A `{"hold": s, "drop": true}` fault: the send was accepted (recorded, counted, statuses
    queued), or the template list read, and its answer is now lost on the way: the connection
    closes without any HTTP answer.

    An `HTTPException`, so it passes the route's `GraphError` handling and aiohttp "answers" it:
    `prepare` closes the transport and raises `ConnectionResetError`, which aiohttp (3.9) treats
    as a premature client disconnection: nothing is written, nothing is logged as an error.
    """

    status_code = 200

    def __init__(self, what: str):
        super().__init__(reason="Dropped")
        self.what = what  # e.g. "wamid.X was accepted"

    async def prepare(self, request: web.BaseRequest) -> None:
        if request.transport is not None:
            request.transport.close()
        raise ConnectionResetError(f"simulated lost answer: {self.what}, the connection is dropped")


def normalise_recipient(value: str) -> str:
    """Meta accepts `+1 (555) 000-1234` and answers with the digits; BSUIDs are kept as given."""
    if BSUID.match(value):
        return value
    digits = "".join(ch for ch in value if ch.isdigit())
    return digits or value


def answer_key(status: Optional[int]) -> str:
    """How a webhook answer is counted in JSON maps: the HTTP status, or "unreachable"."""
    return "unreachable" if status is None else str(status)


class Simulator:
    """The simulated WhatsApp Business phone numbers of one app, talking to one bot."""

    def __init__(self, settings: Settings, registry: TemplateRegistry, state: Optional[SimState] = None):
        self.settings = settings
        self.registry = registry
        self.state = state or SimState(settings)
        self.delivery = WebhookDelivery(settings, self.state)
        self._closing = asyncio.Event()  # ends held answers early when the app shuts down

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.delivery.start()

    async def close(self) -> None:
        self._closing.set()
        await self.delivery.close()

    async def reset(self) -> None:
        await self.delivery.forget_pending()
        self.state.reset()
        self.registry.reset()

    # --- Cloud API: auth -------------------------------------------------------------------

    def check_auth(self, authorization: Optional[str], query_token: Optional[str]) -> None:
        token = query_token
        if authorization:
            scheme, _, value = authorization.partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else None
        if token != self.settings.access_token:
            raise GraphError(190, "Error validating access token: the token is invalid or was not sent as 'Authorization: Bearer <token>'.")

    def check_phone_number_id(self, phone_number_id: str) -> None:
        if phone_number_id not in self.settings.business_numbers:
            raise GraphError(
                100,
                f"Unsupported post request. Object with ID '{phone_number_id}' does not exist, cannot be loaded "
                "due to missing permissions, or does not support this operation.",
                error_type="GraphMethodException",
            )

    def check_business_account(self, waba_id: str) -> None:
        if waba_id != self.settings.business_account_id:
            text = (
                f"Unsupported get request. Object with ID '{waba_id}' does not exist, cannot be loaded due to "
                "missing permissions, or does not support this operation. Please read the Graph API documentation "
                "at https://developers.facebook.com/docs/graph-api"
            )
            raise GraphError(100, text, error_type="GraphMethodException", message=text)

    def reject(self, error: GraphError, body: Any = None) -> GraphError:
        """Count a rejection (and log it on the addressed conversation) before it is answered."""
        self.state.stats.rejected[error.code] += 1
        if isinstance(body, dict) and isinstance(body.get("to", body.get("recipient")), str) and recipient_of(body):
            conv = self.state.resolve(normalise_recipient(recipient_of(body)))
            conv.rejected.append({"timestamp": self.state.now(), "code": error.code, "details": error.details, "payload": body})
            self.state.changed()
        log.info("rejected send: (#%s) %s", error.code, error.details)
        return error

    # --- Cloud API: sending ----------------------------------------------------------------

    async def send(self, version: str, body: Any, phone_number_id: str) -> Dict[str, Any]:
        """`POST /{version}/{phone_number_id}/messages` after auth; raises `GraphError`.

        A queued fault is applied around acceptance: `delay` sleeps before anything, `status`/`code`
        rejects, `async_code` accepts and fails later; `hold` waits after the message is fully
        accepted and `drop` then raises `DropConnection` instead of answering.
        """
        if is_mark_read(body):
            return self.mark_read(body, phone_number_id)
        fault = self.state.faults.popleft() if self.state.faults else None
        async_code: Optional[int] = None
        if fault is not None:
            self.state.stats.faults_served += 1
            if fault.get("delay"):
                await asyncio.sleep(float(fault["delay"]))
            error = fault_error(fault)
            if error is not None:
                raise error
            async_code = int(fault["async_code"]) if fault.get("async_code") else None
        template = validate_send(body, self.registry)
        kind = body.get("type", "text")
        raw_to = recipient_of(body)
        to = normalise_recipient(raw_to)
        conv = self.state.resolve(to)
        now = self.state.now()
        in_window = conv.window_open(now)
        if kind != "template" and not in_window:
            self.state.stats.window_violations += 1
            log.warning("24-hour window violation: %s to %s (last inbound %s, now %s)", kind, to, conv.last_inbound_at, now)
            if self.state.window_errors == "sync":
                raise GraphError(131047)
            async_code = 131047
        wamid = self.state.new_wamid(conv.wa_id, outbound=True)
        record = Record(
            direction="out", wamid=wamid, timestamp=now, type=kind, payload=body, phone_number_id=phone_number_id,
            text=describe(body, template), status="accepted",
        )
        self.state.stats.accepted += 1
        self.state.add(conv, record)
        self._schedule_statuses(conv, record, version, template, in_window, async_code, body.get("biz_opaque_callback_data"))
        contact: Dict[str, str] = {"input": raw_to}
        if BSUID.match(to) and "to" not in body:
            contact["user_id"] = to
        else:
            contact["wa_id"] = to
        result = {"messaging_product": "whatsapp", "contacts": [contact], "messages": [{"id": wamid}]}
        if fault is not None and (fault.get("hold") or fault.get("drop")):
            # "Meta accepted it, but the answer never arrived": everything above is done (recorded,
            # counted, statuses queued on the delivery worker, which does not depend on this
            # request), so a client that gives up, or aiohttp cancelling this handler, loses nothing.
            await self._hold(float(fault.get("hold") or 0))
            if fault.get("drop"):
                raise DropConnection(f"{wamid} was accepted")
        return result

    async def _hold(self, seconds: float) -> None:
        """Wait `seconds` before answering an accepted send, or less if the app shuts down."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def mark_read(self, body: Dict[str, Any], phone_number_id: str) -> Dict[str, Any]:
        if body.get("messaging_product") != "whatsapp":
            raise GraphError(100, "The parameter messaging_product is required and must be 'whatsapp'.")
        found = self.state.find(str(body.get("message_id")))
        if found is None:
            raise GraphError(100, f"Invalid parameter: message_id {body.get('message_id')!r} is not a message of this number.")
        _, record = found
        if record.direction == "in":
            record.status = "read"
            record.read_at = self.state.now()
            record.read_by_phone_number_id = phone_number_id
            if isinstance(body.get("typing_indicator"), dict):
                record.typing_indicator = True
        self.state.stats.marked_read += 1
        self.state.changed()
        return {"success": True}

    def _schedule_statuses(
        self, conv: Conversation, record: Record, version: str, template: Optional[Template],
        in_window: bool, async_code: Optional[int], opaque: Optional[str],
    ) -> None:
        category = template.category.lower() if template else "service"
        free = template is None or (category == "utility" and in_window)
        with_conversation = api_version(version) < 24
        conversation_id = hashlib.md5(f"{conv.wa_id}:{category}:{conv.last_inbound_at}".encode()).hexdigest()
        meta = payloads.metadata(self.settings.display_number(record.phone_number_id), record.phone_number_id)

        def build(status: str):
            def _build() -> Dict[str, Any]:
                now = self.state.now()
                errors = [webhook_error(async_code)] if status == "failed" else None
                conversation = None
                if with_conversation and status != "failed":
                    conversation = {"id": conversation_id, "origin": {"type": category}}
                    if status == "sent":
                        conversation["expiration_timestamp"] = str(now + WINDOW_SECONDS)
                item = payloads.status_object(
                    wamid=record.wamid, status=status, timestamp=now,
                    recipient_id=None if BSUID.match(conv.wa_id) else conv.wa_id,
                    recipient_user_id=conv.user_id,
                    category=category, free=free, conversation=conversation, errors=errors,
                    biz_opaque_callback_data=opaque,
                )
                record.status = status
                record.statuses.append(status)
                if errors:
                    record.errors = errors
                self.state.changed()
                value = payloads.statuses_value(meta, [item])
                return payloads.envelope([payloads.entry(self.settings.business_account_id, [payloads.change(value)])])
            return _build

        if async_code is not None:
            self.delivery.enqueue_status(build("failed"))
            return
        for status in self.state.statuses:
            self.delivery.enqueue_status(build(status))

    # --- Business Management API: templates -------------------------------------------------

    async def list_templates(self, query: Mapping[str, str]) -> Tuple[List[Dict[str, Any]], Page, int]:
        """`GET /{version}/{waba_id}/message_templates` after auth: (data, page, limit); raises `GraphError`.

        A fault of the template-list queue applies as for sends: `delay` first, `status`/`code`
        answers that error, `hold` waits before the answer and `drop` then closes the connection.
        """
        fault = self.state.template_faults.popleft() if self.state.template_faults else None
        if fault is not None:
            self.state.stats.template_list_faults += 1
            if fault.get("delay"):
                await asyncio.sleep(float(fault["delay"]))
            error = fault_error(fault)
            if error is not None:
                raise error
        fields = graph_fields(query.get("fields"))
        limit = page_limit(query.get("limit"))
        templates = [t for t in self.registry.all() if matches_filters(t, query)]
        try:
            found = page(templates, limit, after=query.get("after"), before=query.get("before"))
        except PagingError as exc:
            raise GraphError(100, str(exc)) from None
        data = [t.to_graph(fields) for t in found.items]
        self.state.stats.template_list_reads += 1
        if fault is not None and (fault.get("hold") or fault.get("drop")):
            await self._hold(float(fault.get("hold") or 0))
            if fault.get("drop"):
                raise DropConnection("the template list was read")
        return data, found, limit

    async def change_template(
        self, name: str, language: str, *, status: Optional[str] = None, category: Optional[str] = None,
        quality: Optional[str] = None, reason: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Change a template as Meta would (review, pause, disable, re-categorise, quality) and
        post the business-account webhook for each real change, in that order. KeyError: unknown."""
        before = self.registry.get(name, language)
        if before is None:
            raise KeyError((name, language))
        now = self.state.now()
        pending: List[Tuple[str, Dict[str, Any]]] = []
        if status is not None and status != before.status:
            _, after = self.registry.update(
                name, language, status=status, pauses=before.pauses + (1 if status == "PAUSED" else 0),
                rejected_reason=(reason or "NONE") if status == "REJECTED" else "NONE",
            )
            pending.append((payloads.TEMPLATE_STATUS_FIELD, payloads.template_status_value(
                template_id=after.id, name=name, language=language, event=status, reason=reason,
                category=after.category, pauses=after.pauses, unpaused=before.status == "PAUSED", now=now,
            )))
        if category is not None and category != before.category:
            self.registry.update(name, language, category=category, previous_category=before.category)
            pending.append((payloads.TEMPLATE_CATEGORY_FIELD, payloads.template_category_value(
                template_id=before.id, name=name, language=language, previous=before.category, new=category,
            )))
        if quality is not None and quality != before.quality:
            self.registry.update(name, language, quality=quality)
            pending.append((payloads.TEMPLATE_QUALITY_FIELD, payloads.template_quality_value(
                template_id=before.id, name=name, language=language, previous=before.quality, new=quality,
            )))
        webhooks = [await self._post_business_webhook(field, value, now) for field, value in pending]
        return {"template": template_summary(self.registry.get(name, language)), "webhooks": webhooks}

    async def _post_business_webhook(self, field: str, value: Dict[str, Any], now: int) -> Dict[str, Any]:
        """One signed WABA-level webhook, inline (the caller gets the bot's answer), redelivered
        like the others when the bot does not take it."""
        body = payloads.envelope([payloads.entry(self.settings.business_account_id, [payloads.change(value, field)], time=now)])
        raw = encode(body)
        generation = self.delivery.generation
        try:
            status: Optional[int] = (await self.delivery.post(raw))[0]
        except BotUnreachable:
            status = None
        self.state.stats.template_webhooks += 1
        result: Dict[str, Any] = {"field": field, "webhook_status": status, "body": body}
        if not taken(status) and self.delivery.redeliver(raw, generation):
            result["redelivery"] = "queued"
        return result

    # --- playing customers -----------------------------------------------------------------

    def _prepare_inbound(self, wa_id: str, spec: Dict[str, Any]) -> Tuple[Conversation, Record, Dict[str, Any], Tuple]:
        """Build one customer message and record it *before* the bot sees it: a bot that replies
        while handling the webhook must already find the window open."""
        if not isinstance(spec, dict):
            raise payloads.SpecError("a customer message must be a JSON object")
        # any business number may be written to: the app may be subscribed for other bots' numbers too
        phone_number_id = spec.get("phone_number_id", self.settings.phone_number_id)
        if not isinstance(phone_number_id, str) or not phone_number_id:
            raise payloads.SpecError("phone_number_id must be a non-empty string")
        existing = self.state.conversations.get(wa_id)
        ts = spec.get("timestamp")
        try:
            ts = int(ts) if ts is not None else self.state.now()
        except (TypeError, ValueError):
            raise payloads.SpecError("timestamp must be unix seconds") from None
        default_context = next(
            (m.wamid for m in reversed(existing.messages if existing else [])
             if m.direction == "out" and m.type in ("interactive", "template")),
            None,
        )
        wamid = self.state.new_wamid(wa_id, outbound=False)
        message = payloads.customer_message(
            spec, wamid=wamid, timestamp=ts, wa_id=wa_id,
            display_phone_number=self.settings.display_number(phone_number_id),
            store_media=self.store_placeholder_media,
            default_context_id=default_context,
        )
        conv = self.state.conversation(wa_id)
        undo = (conv.name, conv.user_id)
        conv.name = spec.get("name") or conv.name or payloads.default_name(wa_id)
        conv.user_id = spec.get("user_id") or conv.user_id
        conv.last_inbound_at = ts
        contact = payloads.contact(
            wa_id, conv.name, user_id=spec.get("user_id"), username=spec.get("username"),
            omit_wa_id=bool(spec.get("omit_wa_id")),
        )
        record = Record(direction="in", wamid=wamid, timestamp=ts, type=message["type"], payload=message,
                        phone_number_id=phone_number_id, text=describe(message), status="received")
        self.state.add(conv, record)
        return conv, record, contact, undo

    def _rollback(self, prepared: List[Tuple[Conversation, Record, Dict[str, Any], Tuple]]) -> None:
        """Undo `_prepare_inbound`. The window anchor is re-derived from the inbound messages left,
        not restored, because concurrent plays to one customer may be undone in any order."""
        for conv, record, _, undo in reversed(prepared):
            conv.name, conv.user_id = undo
            self.state.remove(conv, record)
            conv.last_inbound_at = next((m.timestamp for m in reversed(conv.messages) if m.direction == "in"), None)
            if not conv.messages and not conv.rejected:
                self.state.conversations.pop(conv.wa_id, None)

    async def play(self, items: List[Tuple[str, Dict[str, Any]]], *, split_entries: bool = False) -> Dict[str, Any]:
        """Deliver customer messages to the bot in ONE signed webhook POST.

        Messages are grouped per business number and customer: one `changes[]` item each (holding
        all of that customer's `messages[]`, `metadata` of that number), in one `entry[]` or one
        entry per item (`split_entries`). A body the bot does not take is redelivered like Meta
        does (`queued` in the answer); with redelivery off, an unreachable bot raises
        `BotUnreachable` after everything is undone, since the message then never arrives.
        """
        if not items:
            raise payloads.SpecError("no messages to play")
        prepared = []
        try:
            for wa_id, spec in items:
                prepared.append(self._prepare_inbound(wa_id, spec))
        except Exception:
            self._rollback(prepared)
            raise
        groups: Dict[Tuple[str, str], Dict[str, Any]] = {}
        for conv, record, contact, _ in prepared:
            group = groups.setdefault((record.phone_number_id, conv.wa_id), {"contact": contact, "messages": []})
            group["contact"] = contact
            group["messages"].append(record.payload)
        changes = [
            payloads.change(payloads.messages_value(
                payloads.metadata(self.settings.display_number(phone_number_id), phone_number_id),
                [g["contact"]], g["messages"],
            ))
            for (phone_number_id, _), g in groups.items()
        ]
        waba = self.settings.business_account_id
        if split_entries:
            entries = [payloads.entry(waba, [c]) for c in changes]
        else:
            entries = [payloads.entry(waba, changes)]
        body = payloads.envelope(entries)
        raw = encode(body)  # redeliveries repeat these exact bytes
        generation = self.delivery.generation
        try:
            status: Optional[int] = (await self.delivery.post(raw))[0]
        except BotUnreachable:
            if not self.state.redeliver_delays:
                self._rollback(prepared)
                raise
            status = None
        records = [record for _, record, _, _ in prepared]

        def attempted(status: Optional[int]) -> None:
            for record in records:
                record.webhook_status = status
                record.delivery_attempts += 1
            self.state.changed()

        attempted(status)
        self.state.stats.inbound_messages += len(records)
        queued = not taken(status) and self.delivery.redeliver(raw, generation, attempted)
        return {
            "wamids": [r.wamid for r in records],
            "timestamps": [r.timestamp for r in records],
            "webhook_status": status,
            "queued": queued,
            "body": body,
        }

    async def burst(self, count: int, customers: int, concurrency: int, text: str) -> Dict[str, Any]:
        """Play `count` customer messages, one webhook each, round-robin over `customers` new
        customers with at most `concurrency` in flight: the load a busy number puts on the bot.
        `{n}` in `text` is the message's index; `wamids[n]` is None for a message rolled back."""
        wa_ids = [self.state.new_customer_wa_id() for _ in range(customers)]
        gate = asyncio.Semaphore(concurrency)
        wamids: List[Optional[str]] = [None] * count
        first_answers: Counter = Counter()
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def one(n: int) -> None:
            async with gate:
                try:
                    result = await self.play([(wa_ids[n % customers], {"text": text.replace("{n}", str(n))})])
                except BotUnreachable:
                    first_answers[answer_key(None)] += 1
                    return
            wamids[n] = result["wamids"][0]
            first_answers[answer_key(result["webhook_status"])] += 1

        await asyncio.gather(*(one(n) for n in range(count)))
        return {
            "wa_ids": wa_ids,
            "wamids": wamids,
            "first_answers": dict(sorted(first_answers.items())),
            "seconds": round(loop.time() - started, 3),
        }

    # --- media -----------------------------------------------------------------------------

    def store_placeholder_media(self, kind: str, mime_type: str) -> str:
        media_id = payloads.new_media_id()
        self.state.media[media_id] = (PLACEHOLDER_MEDIA + kind.encode(), mime_type)
        return media_id

    def store_media(self, data: bytes, mime_type: str) -> str:
        media_id = payloads.new_media_id()
        self.state.media[media_id] = (data, mime_type)
        return media_id


SIM = web.AppKey("simulator", Simulator)


def graph_fields(text: Optional[str]) -> Tuple[str, ...]:
    """`fields=name,status` → the fields to answer (`id` always comes along); unknown ones are
    Graph error 100, as Meta answers a field the node type does not have."""
    if text is None or not text.strip():
        return DEFAULT_GRAPH_FIELDS
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    for name in fields:
        if name not in GRAPH_FIELDS:
            raise GraphError(100, f"Tried accessing nonexisting field ({name}) on node type (WhatsAppBusinessHSM)",
                             message=f"(#100) Tried accessing nonexisting field ({name}) on node type (WhatsAppBusinessHSM)")
    return fields


def page_limit(text: Optional[str]) -> int:
    if text is None or text == "":
        return TEMPLATE_PAGE_DEFAULT
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise GraphError(100, f"The parameter limit must be a positive integer, got {text!r}.")
    return min(limit, TEMPLATE_PAGE_MAX)


def matches_filters(template: Template, query: Mapping[str, str]) -> bool:
    """Meta's list filters: `status`, `category`, `language` (comma lists) and `name` (part of it)."""
    for key, value in (("status", template.status), ("category", template.category), ("language", template.language)):
        wanted = query.get(key)
        if wanted and value.upper() not in {w.strip().upper() for w in wanted.split(",")}:
            return False
    name = query.get("name")
    return not name or name.lower() in template.name.lower()


def template_summary(t: Template) -> Dict[str, Any]:
    """A registry entry as `/_sim/templates` shows it."""
    return {
        "id": t.id, "name": t.name, "language": t.language, "category": t.category, "status": t.status,
        "quality": t.quality, "previous_category": t.previous_category, "rejected_reason": t.rejected_reason,
        "header_params": t.header_params, "body_params": t.body_params,
        "buttons": [{"type": b.type, "text": b.text} for b in t.buttons],
        "body": t.body_text,
    }


def fault_error(fault: Dict[str, Any]) -> Optional[GraphError]:
    """A queued fault as the error to answer, or None when it only delays, holds, drops or fails later."""
    status = fault.get("status")
    code = fault.get("code")
    if status is None and code is None:
        return None
    status = int(status if status is not None else 400)
    if status < 400:
        return None
    if code is None:
        code = 130429 if status == 429 else (2 if status >= 500 else 1)
    return GraphError(int(code), fault.get("details"), http_status=status, message=fault.get("message"))
