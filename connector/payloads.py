"""Webhook JSON → frozen dataclasses, built once, in one place.

Meta batches: one POST may hold many `entry[]`, each with many `changes[]`, each with many
`messages[]`, `statuses[]`, `calls[]`, `user_preferences[]` or `errors[]`. Every one of them is
read. An item too broken to use is skipped with a reason (for the log) while its siblings still
go through; only a body that is not a webhook at all is refused.

Where things land on `Webhook`:
- `messages`: everything a customer sent that has a wamid (text, media, location, contacts,
  taps, order, reaction, edit, revoke, unsupported...); `inbound.rasa_text` decides which of
  them Rasa sees.
- `system_changes`, `calls`, `preferences`: customer events that are not messages to the NLU.
- `statuses`: delivery news for messages the business sent.
- `errors`: value-level `errors[]` (Meta could not deliver a webhook item to us).
- `notices`: account, template and other non-conversation fields.
"""

import json
import math
from dataclasses import dataclass, field as dataclass_field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

WHATSAPP_OBJECT = "whatsapp_business_account"
MEDIA_TYPES = ("image", "audio", "video", "document", "sticker")


class MalformedWebhook(ValueError):
    """The body is JSON but not a webhook notification."""


@dataclass(frozen=True)
class Reply:
    """A tap on a reply button (`button_reply`), a list row (`list_reply`) or a template
    quick-reply button (`button`, whose id is its payload)."""

    kind: str
    id: str
    title: str
    description: Optional[str] = None


@dataclass(frozen=True)
class MessageContext:
    """What the customer replied to or forwarded, or the catalog product they asked about."""

    message_id: Optional[str]
    from_: Optional[str]
    forwarded: bool = False
    frequently_forwarded: bool = False
    catalog_id: Optional[str] = None
    product_retailer_id: Optional[str] = None


@dataclass(frozen=True)
class Media:
    """An attachment's handle. The bytes stay at Meta: fetch them by `id` (`GET /{media-id}`
    gives a short-lived URL) or by `url` where Meta already sends one."""

    id: str
    mime_type: Optional[str] = None
    sha256: Optional[str] = None
    caption: Optional[str] = None
    filename: Optional[str] = None
    url: Optional[str] = None
    voice: bool = False
    animated: bool = False


@dataclass(frozen=True)
class Location:
    latitude: float
    longitude: float
    name: Optional[str] = None
    address: Optional[str] = None
    url: Optional[str] = None


@dataclass(frozen=True)
class ContactPhone:
    phone: Optional[str]
    wa_id: Optional[str] = None
    type: Optional[str] = None


@dataclass(frozen=True)
class ContactCard:
    """One shared contact card; `raw` keeps the rest of Meta's vCard-like object (addresses,
    urls, birthday)."""

    name: Optional[str]
    phones: Tuple[ContactPhone, ...] = ()
    emails: Tuple[str, ...] = ()
    organization: Optional[str] = None
    raw: Mapping[str, Any] = dataclass_field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class OrderItem:
    product_retailer_id: Optional[str]
    quantity: Optional[int]
    item_price: Optional[float]
    currency: Optional[str]


@dataclass(frozen=True)
class Order:
    """A cart sent from the catalog: the customer's intent to buy, not a payment."""

    catalog_id: Optional[str]
    text: Optional[str]
    items: Tuple[OrderItem, ...]


@dataclass(frozen=True)
class Reaction:
    """An emoji on one of the conversation's messages; `emoji` is None when the customer took
    their reaction back (Meta omits the key, older payloads send "")."""

    message_id: str
    emoji: Optional[str]

    @property
    def removed(self) -> bool:
        return self.emoji is None


@dataclass(frozen=True)
class Referral:
    """Where a customer came from when they tapped a click-to-WhatsApp ad or post."""

    source_url: Optional[str] = None
    source_id: Optional[str] = None
    source_type: Optional[str] = None
    headline: Optional[str] = None
    body: Optional[str] = None
    media_type: Optional[str] = None
    image_url: Optional[str] = None
    video_url: Optional[str] = None
    thumbnail_url: Optional[str] = None
    ctwa_clid: Optional[str] = None
    welcome_message: Optional[str] = None


@dataclass(frozen=True)
class Flow:
    """A submitted WhatsApp Flow (`interactive.nfm_reply`); `response` is its decoded
    `response_json`."""

    name: Optional[str]
    body: Optional[str]
    response: Mapping[str, Any]


@dataclass(frozen=True)
class Edit:
    """A customer's edit of an earlier message (Coexistence numbers): the new content only."""

    original_message_id: str
    type: Optional[str]
    text: Optional[str]
    media: Optional[Media] = None


@dataclass(frozen=True)
class ErrorNotice:
    """An error Meta reports: in a failed status, on an `unsupported` message, or in a
    value's own `errors[]`. Branch on `code`, never on the title."""

    code: Optional[int]
    title: str
    details: Optional[str]
    message: Optional[str] = None
    href: Optional[str] = None
    field: Optional[str] = None
    phone_number_id: Optional[str] = None




@dataclass(frozen=True)
class InboundMessage:
    wamid: str
    type: str
    timestamp: int
    wa_id: Optional[str]
    user_id: Optional[str]
    profile_name: Optional[str]
    phone_number_id: str
    display_phone_number: Optional[str]
    text: Optional[str]
    reply: Optional[Reply]
    context: Optional[MessageContext]
    raw: Mapping[str, Any]
    parent_user_id: Optional[str] = None
    username: Optional[str] = None
    media: Optional[Media] = None
    location: Optional[Location] = None
    contacts: Tuple[ContactCard, ...] = ()
    order: Optional[Order] = None
    reaction: Optional[Reaction] = None
    flow: Optional[Flow] = None
    edit: Optional[Edit] = None
    revoked_message_id: Optional[str] = None
    referral: Optional[Referral] = None
    errors: Tuple[ErrorNotice, ...] = ()

    @property
    def sender_id(self) -> str:
        """Rasa's sender_id: the wa_id, or Meta's business-scoped user id when there is none."""
        return self.wa_id or self.user_id or ""


@dataclass(frozen=True)
class StatusUpdate:
    """Delivery news for a message we sent: sent, delivered, read, played or failed.
    `recipient_id` is the wa_id, or the business-scoped user id when Meta sends no wa_id."""

    wamid: str
    status: str
    timestamp: int
    recipient_id: Optional[str]
    phone_number_id: str
    errors: Tuple[ErrorNotice, ...]
    recipient_user_id: Optional[str] = None
    pricing_category: Optional[str] = None
    pricing_type: Optional[str] = None
    billable: Optional[bool] = None
    biz_opaque_callback_data: Optional[str] = None


@dataclass(frozen=True)
class SystemChange:
    """A customer's number or business-scoped id changed (`system` message). Not something
    the customer said: recorded, never sent to the NLU. For `user_changed_number`, Meta's
    `from` is the OLD number and `system.wa_id` the new one."""

    wamid: str
    type: str
    timestamp: int
    phone_number_id: str
    body: Optional[str]
    old_wa_id: Optional[str]
    new_wa_id: Optional[str]
    old_user_id: Optional[str]
    new_user_id: Optional[str]

    @property
    def old_sender_id(self) -> str:
        return self.old_wa_id or self.old_user_id or ""

    @property
    def new_sender_id(self) -> str:
        return self.new_wa_id or self.new_user_id or ""


@dataclass(frozen=True)
class CallEvent:
    """A WhatsApp call event (`field: "calls"`). A call the customer placed restarts the care
    window like a message, so it carries the customer's id and WhatsApp's timestamp.
    `wa_id`/`user_id` are always the customer's side, whichever way the call went."""

    call_id: str
    event: str
    timestamp: int
    phone_number_id: str
    wa_id: Optional[str]
    user_id: Optional[str]
    direction: Optional[str] = None
    status: Optional[str] = None
    profile_name: Optional[str] = None
    duration: Optional[int] = None
    biz_opaque_callback_data: Optional[str] = None

    @property
    def sender_id(self) -> str:
        return self.wa_id or self.user_id or ""

    @property
    def customer_initiated(self) -> bool:
        return self.direction != "BUSINESS_INITIATED"


@dataclass(frozen=True)
class UserPreference:
    """A customer stopped or resumed a kind of message (`field: "user_preferences"`), e.g.
    `marketing_messages` / `stop`: marketing templates to them fail with 131050 until resumed."""

    wa_id: Optional[str]
    user_id: Optional[str]
    category: str
    value: str
    timestamp: int
    phone_number_id: str
    detail: Optional[str] = None

    @property
    def sender_id(self) -> str:
        return self.wa_id or self.user_id or ""


@dataclass(frozen=True)
class Notice:
    """A webhook field that is not a conversation (account_update,
    message_template_status_update, ...): kept for the log, never acted on here."""

    field: str
    event: Optional[str]
    entry_id: Optional[str]
    time: Optional[int]
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class Webhook:
    messages: Tuple[InboundMessage, ...]
    statuses: Tuple[StatusUpdate, ...]
    skipped: Tuple[str, ...]
    system_changes: Tuple[SystemChange, ...] = ()
    calls: Tuple[CallEvent, ...] = ()
    preferences: Tuple[UserPreference, ...] = ()
    errors: Tuple[ErrorNotice, ...] = ()
    notices: Tuple[Notice, ...] = ()
    in_order: Tuple[Any, ...] = ()
    """Messages, statuses, calls, system changes and preferences as they appear in the body:
    a call between two messages of one customer is handled between them."""


class _Collected:
    """The lists one webhook fills while it is read."""

    def __init__(self) -> None:
        self.messages: List[InboundMessage] = []
        self.statuses: List[StatusUpdate] = []
        self.skipped: List[str] = []
        self.system_changes: List[SystemChange] = []
        self.calls: List[CallEvent] = []
        self.preferences: List[UserPreference] = []
        self.errors: List[ErrorNotice] = []
        self.notices: List[Notice] = []
        self.in_order: List[Any] = []

    def add(self, kind: List[Any], item: Any) -> None:
        kind.append(item)
        self.in_order.append(item)

    def webhook(self) -> Webhook:
        return Webhook(
            messages=tuple(self.messages),
            statuses=tuple(self.statuses),
            skipped=tuple(self.skipped),
            system_changes=tuple(self.system_changes),
            calls=tuple(self.calls),
            preferences=tuple(self.preferences),
            errors=tuple(self.errors),
            notices=tuple(self.notices),
            in_order=tuple(self.in_order),
        )


def parse_webhook(body: Any) -> Webhook:
    if not isinstance(body, Mapping):
        raise MalformedWebhook(f"expected a JSON object, got {type(body).__name__}")
    if body.get("object") != WHATSAPP_OBJECT:
        return Webhook((), (), (f"object {body.get('object')!r} is not {WHATSAPP_OBJECT}",))
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise MalformedWebhook("'entry' must be a list")

    out = _Collected()
    for e, entry in enumerate(entries):
        changes = entry.get("changes") if isinstance(entry, Mapping) else None
        if not isinstance(changes, list):
            out.skipped.append(f"entry[{e}] has no changes list")
            continue
        for c, change in enumerate(changes):
            where = f"entry[{e}].changes[{c}]"
            if not isinstance(change, Mapping) or not isinstance(change.get("value"), Mapping):
                out.skipped.append(f"{where} has no value object")
                continue
            _parse_change(entry, change.get("field"), change["value"], where, out)
    return out.webhook()


def _parse_change(entry: Mapping[str, Any], name: Any, value: Mapping[str, Any], where: str, out: _Collected) -> None:
    if name in ("messages", "calls", "user_preferences"):
        _parse_value(name, value, where, out)
    elif isinstance(name, str) and name:
        out.notices.append(
            Notice(
                field=name,
                event=_text(value.get("event")),
                entry_id=_text(entry.get("id")),
                time=_int(entry.get("time")),
                detail=MappingProxyType(dict(value)),
            )
        )
    else:
        out.skipped.append(f"{where} field {name!r} is not handled")


def _parse_value(name: str, value: Mapping[str, Any], where: str, out: _Collected) -> None:
    metadata = value.get("metadata") if isinstance(value.get("metadata"), Mapping) else {}
    phone_number_id = _text(metadata.get("phone_number_id"))
    if not phone_number_id:
        out.skipped.append(f"{where} has no metadata.phone_number_id")
        return
    display_phone_number = _text(metadata.get("display_phone_number"))
    contacts = [c for c in _list(value.get("contacts")) if isinstance(c, Mapping)]

    def each(key: str, parse: Any) -> None:
        for i, raw in enumerate(_list(value.get(key))):
            try:
                parse(raw)
            except (TypeError, ValueError, KeyError, ArithmeticError, RecursionError) as problem:
                out.skipped.append(f"{where}.{key}[{i}]: {str(problem)[:200]}")

    if name == "messages":
        def message(raw: Any) -> None:
            if isinstance(raw, Mapping) and raw.get("type") == "system":
                out.add(out.system_changes, _system_change(raw, phone_number_id))
            else:
                out.add(out.messages, _message(raw, contacts, phone_number_id, display_phone_number))

        each("messages", message)
        each("statuses", lambda raw: out.add(out.statuses, _status(raw, contacts, phone_number_id)))
    elif name == "calls":
        each("calls", lambda raw: out.add(out.calls, _call(raw, contacts, phone_number_id, display_phone_number)))
        each("statuses", lambda raw: out.add(out.calls, _call_status(raw, contacts, phone_number_id)))
    else:
        each("user_preferences", lambda raw: out.add(out.preferences, _preference(raw, contacts, phone_number_id)))

    for error in _list(value.get("errors")):
        if isinstance(error, Mapping):
            out.errors.append(_error(error, field=name, phone_number_id=phone_number_id))
        else:
            out.skipped.append(f"{where} reports error {error!r}")


# --- identity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Person:
    wa_id: Optional[str]
    user_id: Optional[str]
    parent_user_id: Optional[str]
    profile_name: Optional[str]
    username: Optional[str]


def _person(
    contacts: List[Mapping[str, Any]],
    wa_id: Optional[str],
    user_id: Optional[str],
    parent_user_id: Optional[str] = None,
) -> _Person:
    """One customer's ids, from the item itself, completed by their `contacts[]` entry (where
    usernames and, for username customers, the business-scoped `user_id` live)."""
    contact = _contact_for(contacts, wa_id, user_id)
    profile = contact.get("profile") if isinstance(contact.get("profile"), Mapping) else {}
    return _Person(
        wa_id=wa_id or _text(contact.get("wa_id")),
        user_id=user_id or _text(contact.get("user_id")),
        parent_user_id=parent_user_id or _text(contact.get("parent_user_id")),
        profile_name=_text(profile.get("name")),
        username=_text(profile.get("username")),
    )


def _contact_for(contacts: List[Mapping[str, Any]], wa_id: Optional[str], user_id: Optional[str]) -> Mapping[str, Any]:
    """The `contacts[]` entry of this item's customer (Meta lists one per customer in a value)."""
    for contact in contacts:
        if (wa_id and contact.get("wa_id") == wa_id) or (user_id and contact.get("user_id") == user_id):
            return contact
    if len(contacts) == 1 and not _names_someone_else(contacts[0], wa_id, user_id):
        return contacts[0]
    return {}


def _names_someone_else(contact: Mapping[str, Any], wa_id: Optional[str], user_id: Optional[str]) -> bool:
    """A lone contact may complete an item's ids only if none of its ids contradicts them: else
    one customer's text would land in another's conversation."""
    return bool(
        (wa_id and contact.get("wa_id") and contact.get("wa_id") != wa_id)
        or (user_id and contact.get("user_id") and contact.get("user_id") != user_id)
    )


# --- messages ------------------------------------------------------------------------------


def _message(
    raw: Any,
    contacts: List[Mapping[str, Any]],
    phone_number_id: str,
    display_phone_number: Optional[str],
) -> InboundMessage:
    if not isinstance(raw, Mapping):
        raise TypeError("message is not an object")
    wamid = _required(raw, "id")
    message_type = _required(raw, "type")
    timestamp = _timestamp(raw.get("timestamp"))
    person = _person(
        contacts, _text(raw.get("from")), _text(raw.get("from_user_id")), _text(raw.get("from_parent_user_id"))
    )
    if not person.wa_id and not person.user_id:
        raise ValueError("message has neither 'from' nor a contact wa_id/user_id")

    body = raw.get(message_type)
    body = body if isinstance(body, Mapping) else {}
    content: Dict[str, Any] = {}
    if message_type in MEDIA_TYPES:
        content["media"] = _media(body, message_type)
    elif message_type == "location":
        content["location"] = _location(body)
    elif message_type == "contacts":
        content["contacts"] = _contact_cards(raw.get("contacts"))
    elif message_type == "order":
        content["order"] = _order(body)
    elif message_type == "reaction":
        content["reaction"] = Reaction(message_id=_required(body, "message_id"), emoji=_text(body.get("emoji")))
    elif message_type == "interactive" and body.get("type") == "nfm_reply":
        content["flow"] = _flow(body.get("nfm_reply"))
    elif message_type == "edit":
        content["edit"] = _edit(body)
    elif message_type == "revoke":
        content["revoked_message_id"] = _required(body, "original_message_id")

    return InboundMessage(
        wamid=wamid,
        type=message_type,
        timestamp=timestamp,
        wa_id=person.wa_id,
        user_id=person.user_id,
        profile_name=person.profile_name,
        phone_number_id=phone_number_id,
        display_phone_number=display_phone_number,
        text=_message_text(body, message_type),
        reply=_reply(raw, message_type),
        context=_context(raw.get("context")),
        raw=MappingProxyType(dict(raw)),
        parent_user_id=person.parent_user_id,
        username=person.username,
        referral=_referral(raw.get("referral")),
        errors=_errors(raw.get("errors")),
        **content,
    )


def _message_text(body: Mapping[str, Any], message_type: str) -> Optional[str]:
    """What the customer typed: a text body or a media caption."""
    if message_type == "text":
        return _text(body.get("body"))
    if message_type in MEDIA_TYPES:
        return _text(body.get("caption"))
    return None


def _media(body: Mapping[str, Any], message_type: str) -> Media:
    if not body:
        raise ValueError(f"{message_type} message has no '{message_type}' object")
    return Media(
        id=_required(body, "id"),
        mime_type=_text(body.get("mime_type")),
        sha256=_text(body.get("sha256")),
        caption=_text(body.get("caption")),
        filename=_text(body.get("filename")),
        url=_text(body.get("url")),
        voice=body.get("voice") is True,
        animated=body.get("animated") is True,
    )


def _location(body: Mapping[str, Any]) -> Location:
    return Location(
        latitude=_coordinate(body.get("latitude"), "latitude", 90),
        longitude=_coordinate(body.get("longitude"), "longitude", 180),
        name=_text(body.get("name")),
        address=_text(body.get("address")),
        url=_text(body.get("url")),
    )


def _coordinate(value: Any, name: str, limit: float) -> float:
    if isinstance(value, bool):
        raise ValueError(f"bad {name} {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"bad {name}") from None
    if not math.isfinite(number) or abs(number) > limit:
        raise ValueError(f"bad {name} {number!r}")
    return number


def _contact_cards(raw: Any) -> Tuple[ContactCard, ...]:
    cards = tuple(_contact_card(card) for card in _list(raw) if isinstance(card, Mapping))
    if not cards:
        raise ValueError("contacts message has no contact cards")
    return cards


def _contact_card(card: Mapping[str, Any]) -> ContactCard:
    name = card.get("name") if isinstance(card.get("name"), Mapping) else {}
    org = card.get("org") if isinstance(card.get("org"), Mapping) else {}
    given = " ".join(p for p in (_text(name.get("first_name")), _text(name.get("last_name"))) if p)
    return ContactCard(
        name=_text(name.get("formatted_name")) or given or None,
        phones=tuple(
            ContactPhone(phone=_text(p.get("phone")), wa_id=_text(p.get("wa_id")), type=_text(p.get("type")))
            for p in _list(card.get("phones"))
            if isinstance(p, Mapping) and (p.get("phone") or p.get("wa_id"))
        ),
        emails=tuple(
            e["email"] for e in _list(card.get("emails")) if isinstance(e, Mapping) and _text(e.get("email"))
        ),
        organization=_text(org.get("company")),
        raw=MappingProxyType(dict(card)),
    )


def _order(body: Mapping[str, Any]) -> Order:
    if not body:
        raise ValueError("order message has no 'order' object")
    return Order(
        catalog_id=_text(body.get("catalog_id")),
        text=_text(body.get("text")),
        items=tuple(
            OrderItem(
                product_retailer_id=_text(item.get("product_retailer_id")),
                quantity=_int(item.get("quantity")),
                item_price=_number(item.get("item_price")),
                currency=_text(item.get("currency")),
            )
            for item in _list(body.get("product_items"))
            if isinstance(item, Mapping)
        ),
    )


def _flow(raw: Any) -> Flow:
    if not isinstance(raw, Mapping):
        raise ValueError("nfm_reply is not an object")
    response: Any = raw.get("response_json")
    if isinstance(response, str):
        try:
            response = json.loads(response)
        except (ValueError, RecursionError):
            response = None
    return Flow(
        name=_text(raw.get("name")),
        body=_text(raw.get("body")),
        response=MappingProxyType(dict(response)) if isinstance(response, Mapping) else MappingProxyType({}),
    )


def _edit(body: Mapping[str, Any]) -> Edit:
    original = _required(body, "original_message_id")
    inner = body.get("message") if isinstance(body.get("message"), Mapping) else {}
    inner_type = _text(inner.get("type"))
    inner_body = inner.get(inner_type) if inner_type and isinstance(inner.get(inner_type), Mapping) else {}
    media = None
    if inner_type in MEDIA_TYPES and _text(inner_body.get("id")):
        media = _media(inner_body, inner_type)
    return Edit(
        original_message_id=original,
        type=inner_type,
        text=_message_text(inner_body, inner_type or ""),
        media=media,
    )


def _referral(raw: Any) -> Optional[Referral]:
    if not isinstance(raw, Mapping):
        return None
    welcome = raw.get("welcome_message")
    return Referral(
        source_url=_text(raw.get("source_url")),
        source_id=_text(raw.get("source_id")),
        source_type=_text(raw.get("source_type")),
        headline=_text(raw.get("headline")),
        body=_text(raw.get("body")),
        media_type=_text(raw.get("media_type")),
        image_url=_text(raw.get("image_url")),
        video_url=_text(raw.get("video_url")),
        thumbnail_url=_text(raw.get("thumbnail_url")),
        ctwa_clid=_text(raw.get("ctwa_clid")),
        welcome_message=_text(welcome.get("text")) if isinstance(welcome, Mapping) else None,
    )


def _reply(raw: Mapping[str, Any], message_type: str) -> Optional[Reply]:
    if message_type == "button":
        button = raw.get("button")
        if isinstance(button, Mapping) and (button.get("payload") or button.get("text")):
            text = _text(button.get("text")) or ""
            return Reply(kind="button", id=_text(button.get("payload")) or text, title=text or "")
        return None
    if message_type != "interactive" or not isinstance(raw.get("interactive"), Mapping):
        return None
    interactive = raw["interactive"]
    kind = interactive.get("type")
    choice = interactive.get(kind) if isinstance(kind, str) else None
    if kind not in ("button_reply", "list_reply") or not isinstance(choice, Mapping):
        return None
    return Reply(
        kind=kind,
        id=_text(choice.get("id")) or "",
        title=_text(choice.get("title")) or "",
        description=_text(choice.get("description")),
    )


def _context(raw: Any) -> Optional[MessageContext]:
    if not isinstance(raw, Mapping):
        return None
    product = raw.get("referred_product") if isinstance(raw.get("referred_product"), Mapping) else {}
    return MessageContext(
        message_id=_text(raw.get("id")),
        from_=_text(raw.get("from")),
        forwarded=raw.get("forwarded") is True,
        frequently_forwarded=raw.get("frequently_forwarded") is True,
        catalog_id=_text(product.get("catalog_id")),
        product_retailer_id=_text(product.get("product_retailer_id")),
    )


def _system_change(raw: Mapping[str, Any], phone_number_id: str) -> SystemChange:
    """`from` (when present) is the customer before the change; `system` says what they are now."""
    system = raw.get("system")
    if not isinstance(system, Mapping):
        raise ValueError("system message has no 'system' object")
    kind = _text(system.get("type")) or "unknown"
    sender = _text(raw.get("from"))
    sender_user_id = _text(raw.get("from_user_id"))
    new_wa_id = _text(system.get("wa_id")) or _text(system.get("new_wa_id"))
    if kind != "user_changed_number":
        new_wa_id = new_wa_id or sender
    new_user_id = _text(system.get("user_id"))
    if kind not in ("user_changed_number", "user_changed_user_id"):
        new_user_id = new_user_id or sender_user_id
    change = SystemChange(
        wamid=_required(raw, "id"),
        type=kind,
        timestamp=_timestamp(raw.get("timestamp")),
        phone_number_id=phone_number_id,
        body=_text(system.get("body")),
        old_wa_id=sender,
        new_wa_id=new_wa_id,
        old_user_id=_text(system.get("previous_user_id")) or sender_user_id,
        new_user_id=new_user_id,
    )
    if not change.old_sender_id and not change.new_sender_id:
        raise ValueError("system message names no customer")
    return change


# --- statuses, calls, preferences, errors --------------------------------------------------


def _status(raw: Any, contacts: List[Mapping[str, Any]], phone_number_id: str) -> StatusUpdate:
    if not isinstance(raw, Mapping):
        raise TypeError("status is not an object")
    person = _person(contacts, _text(raw.get("recipient_id")), _text(raw.get("recipient_user_id")))
    pricing = raw.get("pricing") if isinstance(raw.get("pricing"), Mapping) else {}
    billable = pricing.get("billable")
    return StatusUpdate(
        wamid=_required(raw, "id"),
        status=_required(raw, "status"),
        timestamp=_timestamp(raw.get("timestamp")),
        recipient_id=person.wa_id or person.user_id,
        phone_number_id=phone_number_id,
        errors=_errors(raw.get("errors")),
        recipient_user_id=person.user_id,
        pricing_category=_text(pricing.get("category")),
        pricing_type=_text(pricing.get("type")),
        billable=billable if isinstance(billable, bool) else None,
        biz_opaque_callback_data=_text(raw.get("biz_opaque_callback_data")),
    )


def _call(
    raw: Any, contacts: List[Mapping[str, Any]], phone_number_id: str, display_phone_number: Optional[str]
) -> CallEvent:
    if not isinstance(raw, Mapping):
        raise TypeError("call is not an object")
    direction = _text(raw.get("direction"))
    side = "to" if direction == "BUSINESS_INITIATED" else "from"
    wa_id = _text(raw.get(side))
    if side == "from" and wa_id and wa_id == display_phone_number:
        side, wa_id = "to", _text(raw.get("to"))
    person = _person(contacts, wa_id, _text(raw.get(f"{side}_user_id")))
    if not person.wa_id and not person.user_id:
        raise ValueError("call names no customer")
    return CallEvent(
        call_id=_required(raw, "id"),
        event=_required(raw, "event"),
        timestamp=_timestamp(raw.get("timestamp")),
        phone_number_id=phone_number_id,
        wa_id=person.wa_id,
        user_id=person.user_id,
        direction=direction,
        status=_text(raw.get("status")),
        profile_name=person.profile_name,
        duration=_int(raw.get("duration")),
        biz_opaque_callback_data=_text(raw.get("biz_opaque_callback_data")),
    )


def _call_status(raw: Any, contacts: List[Mapping[str, Any]], phone_number_id: str) -> CallEvent:
    """Ringing/accepted/rejected news for a call the business placed (`statuses[]` under
    `field: "calls"`): not a message status."""
    if not isinstance(raw, Mapping):
        raise TypeError("call status is not an object")
    person = _person(contacts, _text(raw.get("recipient_id")), _text(raw.get("recipient_user_id")))
    if not person.wa_id and not person.user_id:
        raise ValueError("call status names no customer")
    return CallEvent(
        call_id=_required(raw, "id"),
        event="status",
        timestamp=_timestamp(raw.get("timestamp")),
        phone_number_id=phone_number_id,
        wa_id=person.wa_id,
        user_id=person.user_id,
        direction="BUSINESS_INITIATED",
        status=_required(raw, "status"),
        profile_name=person.profile_name,
        biz_opaque_callback_data=_text(raw.get("biz_opaque_callback_data")),
    )


def _preference(raw: Any, contacts: List[Mapping[str, Any]], phone_number_id: str) -> UserPreference:
    if not isinstance(raw, Mapping):
        raise TypeError("user preference is not an object")
    person = _person(contacts, _text(raw.get("wa_id")), _text(raw.get("user_id")))
    if not person.wa_id and not person.user_id:
        raise ValueError("user preference names no customer")
    return UserPreference(
        wa_id=person.wa_id,
        user_id=person.user_id,
        category=_required(raw, "category"),
        value=_required(raw, "value"),
        timestamp=_timestamp(raw.get("timestamp")),
        phone_number_id=phone_number_id,
        detail=_text(raw.get("detail")),
    )


def _errors(raw: Any) -> Tuple[ErrorNotice, ...]:
    return tuple(_error(error) for error in _list(raw) if isinstance(error, Mapping))


def _error(error: Mapping[str, Any], field: Optional[str] = None, phone_number_id: Optional[str] = None) -> ErrorNotice:
    data = error.get("error_data") if isinstance(error.get("error_data"), Mapping) else {}
    return ErrorNotice(
        code=_int(error.get("code")),
        title=str(error.get("title") or error.get("message") or ""),
        details=_text(data.get("details")),
        message=_text(error.get("message")),
        href=_text(error.get("href")),
        field=field,
        phone_number_id=phone_number_id,
    )


# --- scalars -------------------------------------------------------------------------------


def _required(raw: Mapping[str, Any], key: str) -> str:
    value = _text(raw.get(key))
    if not value:
        raise ValueError(f"missing '{key}'")
    return value


_LATEST_TIMESTAMP = 10**11  # the year 5138: anything later is garbage, not a clock


def _timestamp(value: Any) -> int:
    """Meta sends unix seconds as a string (an integer in `user_preferences`); a missing or
    garbled one makes the item unusable, because the care window is judged from it."""
    shown = repr(value)[:40]
    if isinstance(value, bool) or (isinstance(value, str) and len(value) > 20):
        raise ValueError(f"bad timestamp {shown}")
    try:
        seconds = int(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError(f"bad timestamp {shown}") from None
    if not 0 < seconds < _LATEST_TIMESTAMP:
        raise ValueError(f"bad timestamp {shown}")
    return seconds


def _int(value: Any) -> Optional[int]:
    """An optional integer that Meta sends as a number or a numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip()) if value is not None else None
    except ValueError:
        return None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(str(value))
    except (ValueError, OverflowError):
        return None


def _text(value: Any) -> Optional[str]:
    if value is None or isinstance(value, (bool, Mapping, list)):
        return None
    text = str(value)
    return text if text.strip() else None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []
