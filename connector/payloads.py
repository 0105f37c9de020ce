"""Webhook JSON → frozen dataclasses, built once, in one place.

Meta batches: one POST may hold many `entry[]`, each with many `changes[]`, each with many
`messages[]` and `statuses[]`. Every one of them is read. An item too broken to use is skipped
with a reason (for the log) while its siblings still go through; only a body that is not a
webhook at all is refused.
"""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, List, Mapping, Optional, Tuple

WHATSAPP_OBJECT = "whatsapp_business_account"


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
    """What the customer replied to or forwarded."""

    message_id: Optional[str]
    from_: Optional[str]
    forwarded: bool = False
    frequently_forwarded: bool = False


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

    @property
    def sender_id(self) -> str:
        """Rasa's sender_id: the wa_id, or Meta's business-scoped user id when there is none."""
        return self.wa_id or self.user_id or ""


@dataclass(frozen=True)
class StatusError:
    code: Optional[int]
    title: str
    details: Optional[str]


@dataclass(frozen=True)
class StatusUpdate:
    """Delivery news for a message we sent: sent, delivered, read, played or failed."""

    wamid: str
    status: str
    timestamp: int
    recipient_id: Optional[str]
    phone_number_id: str
    errors: Tuple[StatusError, ...]


@dataclass(frozen=True)
class Webhook:
    messages: Tuple[InboundMessage, ...]
    statuses: Tuple[StatusUpdate, ...]
    skipped: Tuple[str, ...]


def parse_webhook(body: Any) -> Webhook:
    if not isinstance(body, Mapping):
        raise MalformedWebhook(f"expected a JSON object, got {type(body).__name__}")
    if body.get("object") != WHATSAPP_OBJECT:
        return Webhook((), (), (f"object {body.get('object')!r} is not {WHATSAPP_OBJECT}",))
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise MalformedWebhook("'entry' must be a list")

    messages: List[InboundMessage] = []
    statuses: List[StatusUpdate] = []
    skipped: List[str] = []
    for e, entry in enumerate(entries):
        changes = entry.get("changes") if isinstance(entry, Mapping) else None
        if not isinstance(changes, list):
            skipped.append(f"entry[{e}] has no changes list")
            continue
        for c, change in enumerate(changes):
            where = f"entry[{e}].changes[{c}]"
            if not isinstance(change, Mapping) or not isinstance(change.get("value"), Mapping):
                skipped.append(f"{where} has no value object")
                continue
            if change.get("field") != "messages":
                skipped.append(f"{where} field {change.get('field')!r} is not handled")
                continue
            _parse_value(change["value"], where, messages, statuses, skipped)
    return Webhook(tuple(messages), tuple(statuses), tuple(skipped))


def _parse_value(
    value: Mapping[str, Any],
    where: str,
    messages: List[InboundMessage],
    statuses: List[StatusUpdate],
    skipped: List[str],
) -> None:
    metadata = value.get("metadata") if isinstance(value.get("metadata"), Mapping) else {}
    phone_number_id = _text(metadata.get("phone_number_id"))
    if not phone_number_id:
        skipped.append(f"{where} has no metadata.phone_number_id")
        return
    display_phone_number = _text(metadata.get("display_phone_number"))
    contacts = [c for c in _list(value.get("contacts")) if isinstance(c, Mapping)]

    for m, raw in enumerate(_list(value.get("messages"))):
        try:
            messages.append(_message(raw, contacts, phone_number_id, display_phone_number))
        except (TypeError, ValueError, KeyError) as problem:
            skipped.append(f"{where}.messages[{m}]: {problem}")

    for s, raw in enumerate(_list(value.get("statuses"))):
        try:
            statuses.append(_status(raw, phone_number_id))
        except (TypeError, ValueError, KeyError) as problem:
            skipped.append(f"{where}.statuses[{s}]: {problem}")

    for error in _list(value.get("errors")):
        skipped.append(f"{where} reports error {error!r}")


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

    wa_id = _text(raw.get("from"))
    user_id = _text(raw.get("from_user_id"))
    contact = _contact_for(contacts, wa_id, user_id)
    wa_id = wa_id or _text(contact.get("wa_id"))
    user_id = user_id or _text(contact.get("user_id"))
    if not wa_id and not user_id:
        raise ValueError("message has neither 'from' nor a contact wa_id/user_id")
    profile = contact.get("profile") if isinstance(contact.get("profile"), Mapping) else {}

    return InboundMessage(
        wamid=wamid,
        type=message_type,
        timestamp=timestamp,
        wa_id=wa_id,
        user_id=user_id,
        profile_name=_text(profile.get("name")),
        phone_number_id=phone_number_id,
        display_phone_number=display_phone_number,
        text=_message_text(raw, message_type),
        reply=_reply(raw, message_type),
        context=_context(raw.get("context")),
        raw=MappingProxyType(dict(raw)),
    )


def _contact_for(contacts: List[Mapping[str, Any]], wa_id: Optional[str], user_id: Optional[str]) -> Mapping[str, Any]:
    """The `contacts[]` entry of this message's sender (Meta lists one per sender in a value)."""
    for contact in contacts:
        if (wa_id and contact.get("wa_id") == wa_id) or (user_id and contact.get("user_id") == user_id):
            return contact
    return contacts[0] if len(contacts) == 1 else {}


def _message_text(raw: Mapping[str, Any], message_type: str) -> Optional[str]:
    body = raw.get(message_type)
    if not isinstance(body, Mapping):
        return None
    if message_type == "text":
        return _text(body.get("body"))
    return _text(body.get("caption"))


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
    return MessageContext(
        message_id=_text(raw.get("id")),
        from_=_text(raw.get("from")),
        forwarded=raw.get("forwarded") is True,
        frequently_forwarded=raw.get("frequently_forwarded") is True,
    )


def _status(raw: Any, phone_number_id: str) -> StatusUpdate:
    if not isinstance(raw, Mapping):
        raise TypeError("status is not an object")
    errors = tuple(
        StatusError(
            code=error.get("code") if isinstance(error.get("code"), int) else None,
            title=str(error.get("title") or error.get("message") or ""),
            details=_text((error.get("error_data") or {}).get("details"))
            if isinstance(error.get("error_data"), Mapping)
            else None,
        )
        for error in _list(raw.get("errors"))
        if isinstance(error, Mapping)
    )
    return StatusUpdate(
        wamid=_required(raw, "id"),
        status=_required(raw, "status"),
        timestamp=_timestamp(raw.get("timestamp")),
        recipient_id=_text(raw.get("recipient_id")) or _text(raw.get("recipient_user_id")),
        phone_number_id=phone_number_id,
        errors=errors,
    )


def _required(raw: Mapping[str, Any], key: str) -> str:
    value = _text(raw.get(key))
    if not value:
        raise ValueError(f"missing '{key}'")
    return value


def _timestamp(value: Any) -> int:
    """Meta sends unix seconds as a string; a missing or garbled one makes the item unusable,
    because the care window is judged from it."""
    if isinstance(value, bool):
        raise ValueError(f"bad timestamp {value!r}")
    try:
        seconds = int(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError(f"bad timestamp {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"bad timestamp {value!r}")
    return seconds


def _text(value: Any) -> Optional[str]:
    if value is None or isinstance(value, (bool, Mapping, list)):
        return None
    text = str(value)
    return text if text.strip() else None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []
