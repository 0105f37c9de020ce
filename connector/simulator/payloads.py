"""Meta-shaped webhook bodies: inbound customer messages and outbound message statuses.

Shapes follow Meta's webhook reference (`object` → `entry[]` → `changes[]` → `value` with
`metadata`, `contacts[]`, `messages[]` or `statuses[]`), down to details connectors trip on:
timestamps are strings, `from`/`wa_id` are omitted for username customers, ids look like wamids.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any, Callable, Dict, List, Optional

MEDIA_KINDS = ("image", "audio", "video", "document", "sticker")
DEFAULT_MIME = {
    "image": "image/jpeg",
    "audio": "audio/ogg; codecs=opus",
    "video": "video/mp4",
    "document": "application/pdf",
    "sticker": "image/webp",
}
# Spec keys that name the customer's message content, in the order they are looked for.
CONTENT_KEYS = (
    "text", "button_reply", "list_reply", "button", *MEDIA_KINDS,
    "location", "contacts", "reaction", "order", "system", "unsupported",
)


class SpecError(ValueError):
    """A customer-message spec the simulator cannot turn into a webhook (answered 400)."""


def new_wamid(wa_id: str, outbound: bool) -> str:
    """A wamid shaped like Meta's: base64 of a small binary record holding the customer's number
    and a random hex id (outbound ids carry a different marker byte than inbound ones)."""
    phone = "".join(ch for ch in wa_id if ch.isalnum()).encode()[:60] or b"0"
    rand = secrets.token_hex(9 if outbound else 10).upper().encode()
    raw = (
        b"\x1c\x18" + bytes([len(phone)]) + phone
        + b"\x15\x02\x00" + (b"\x11" if outbound else b"\x12")
        + b"\x18" + bytes([len(rand)]) + rand + b"\x00"
    )
    return "wamid." + base64.b64encode(raw).decode()


def new_media_id() -> str:
    return str(secrets.randbelow(9 * 10**15) + 10**15)


def fake_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def default_name(wa_id: str) -> str:
    return f"Customer {wa_id[-4:]}"


# --- inbound -------------------------------------------------------------------------------


def customer_message(
    spec: Dict[str, Any],
    *,
    wamid: str,
    timestamp: int,
    wa_id: str,
    display_phone_number: str,
    store_media: Callable[[str, str], str],
    default_context_id: Optional[str] = None,
) -> Dict[str, Any]:
    """One `messages[]` item from a spec like `{"text": "hi"}` or `{"button_reply": {...}}`.

    `store_media(kind, mime_type)` registers placeholder media and returns its id, so the
    connector can fetch media exactly as from Meta (`GET /{media-id}` then the URL).
    """
    if not isinstance(spec, dict):
        raise SpecError("a customer message must be a JSON object")
    kind, content = _content(spec)
    message: Dict[str, Any] = {}
    if not spec.get("omit_wa_id"):
        message["from"] = wa_id
    if spec.get("user_id"):
        message["from_user_id"] = spec["user_id"]
    message["id"] = wamid
    message["timestamp"] = str(int(timestamp))

    context_id = (spec.get("context") or {}).get("id") if isinstance(spec.get("context"), dict) else None
    if kind in ("button_reply", "list_reply", "button") and not context_id:
        context_id = default_context_id
    if context_id or isinstance(spec.get("context"), dict):
        context = dict(spec.get("context") or {})
        context.setdefault("from", display_phone_number)
        if context_id:
            context["id"] = context_id
        message["context"] = context

    if kind == "text":
        body = content.get("body") if isinstance(content, dict) else content
        if not isinstance(body, str):
            raise SpecError("text must be a string or {\"body\": string}")
        message.update(type="text", text={"body": body})
    elif kind in ("button_reply", "list_reply"):
        reply = _require(content, kind, ("id", "title"))
        item = {"id": str(reply["id"]), "title": str(reply["title"])}
        if kind == "list_reply" and reply.get("description"):
            item["description"] = str(reply["description"])
        message.update(type="interactive", interactive={"type": kind, kind: item})
    elif kind == "button":
        button = _require(content, kind, ("text",))
        message.update(type="button", button={"payload": str(button.get("payload", button["text"])), "text": str(button["text"])})
    elif kind in MEDIA_KINDS:
        media = dict(content) if isinstance(content, dict) else {}
        mime = media.pop("mime_type", DEFAULT_MIME[kind])
        media_id = media.pop("id", None) or store_media(kind, mime)
        item = {"mime_type": mime, "sha256": media.pop("sha256", fake_sha256(media_id.encode())), "id": media_id}
        if kind == "audio":
            item["voice"] = bool(media.pop("voice", False))
        item.update(media)
        message.update(type=kind, **{kind: item})
    elif kind == "location":
        loc = _require(content, kind, ("latitude", "longitude"))
        message.update(type="location", location=dict(loc))
    elif kind == "unsupported":
        message.update(
            type="unsupported",
            errors=[{
                "code": 131051,
                "title": "Message type unknown",
                "message": "Message type unknown",
                "error_data": {"details": "Message type is currently not supported."},
            }],
        )
        if isinstance(content, dict) and content:
            message["unsupported"] = content
    else:  # contacts, reaction, order, system, or any explicit {"type": ..., <type>: ...}
        message.update(type=kind, **{kind: content})
    if isinstance(spec.get("referral"), dict):
        message["referral"] = spec["referral"]
    return message


def _content(spec: Dict[str, Any]):
    explicit = spec.get("type")
    if explicit:
        return str(explicit), spec.get(explicit, {})
    for key in CONTENT_KEYS:
        if key in spec:
            return key, spec[key]
    raise SpecError(f"a customer message needs one of: {', '.join(CONTENT_KEYS)} (or \"type\")")


def _require(content: Any, kind: str, keys) -> Dict[str, Any]:
    if not isinstance(content, dict) or any(k not in content for k in keys):
        raise SpecError(f"{kind} needs {', '.join(keys)}")
    return content


def contact(wa_id: str, name: str, *, user_id: Optional[str] = None, username: Optional[str] = None, omit_wa_id: bool = False) -> Dict[str, Any]:
    profile: Dict[str, Any] = {"name": name}
    if username:
        profile["username"] = username
    item: Dict[str, Any] = {"profile": profile}
    if not omit_wa_id:
        item["wa_id"] = wa_id
    if user_id:
        item["user_id"] = user_id
    return item


# --- envelope ------------------------------------------------------------------------------


def metadata(display_phone_number: str, phone_number_id: str) -> Dict[str, str]:
    return {"display_phone_number": display_phone_number, "phone_number_id": phone_number_id}


def messages_value(meta: Dict[str, str], contacts: List[Dict[str, Any]], messages: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"messaging_product": "whatsapp", "metadata": meta, "contacts": contacts, "messages": messages}


def statuses_value(meta: Dict[str, str], statuses: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"messaging_product": "whatsapp", "metadata": meta, "statuses": statuses}


def change(value: Dict[str, Any], field: str = "messages") -> Dict[str, Any]:
    return {"value": value, "field": field}


def entry(business_account_id: str, changes: List[Dict[str, Any]], time: Optional[int] = None) -> Dict[str, Any]:
    """One `entry[]` item; business-account webhooks (templates) carry the trigger `time` too."""
    item: Dict[str, Any] = {"id": business_account_id}
    if time is not None:
        item["time"] = int(time)
    item["changes"] = changes
    return item


def envelope(entries: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"object": "whatsapp_business_account", "entry": entries}


# --- statuses ------------------------------------------------------------------------------


def status_object(
    *,
    wamid: str,
    status: str,
    timestamp: int,
    recipient_id: Optional[str],
    recipient_user_id: Optional[str] = None,
    category: str = "service",
    free: bool = True,
    conversation: Optional[Dict[str, Any]] = None,
    errors: Optional[List[Dict[str, Any]]] = None,
    biz_opaque_callback_data: Optional[str] = None,
) -> Dict[str, Any]:
    """One `statuses[]` item. Failed statuses carry `errors[]` and no pricing, as at Meta."""
    item: Dict[str, Any] = {"id": wamid, "status": status, "timestamp": str(int(timestamp))}
    if recipient_id:
        item["recipient_id"] = recipient_id
    if recipient_user_id:
        item["recipient_user_id"] = recipient_user_id
    if biz_opaque_callback_data:
        item["biz_opaque_callback_data"] = biz_opaque_callback_data
    if status == "failed":
        item["errors"] = errors or []
        return item
    if conversation:
        item["conversation"] = conversation
    item["pricing"] = {
        "billable": not free,
        "pricing_model": "PMP",
        "category": category,
        "type": "free_customer_service" if free else "regular",
    }
    return item


# --- business-account webhooks: templates --------------------------------------------------

TEMPLATE_STATUS_FIELD = "message_template_status_update"
TEMPLATE_CATEGORY_FIELD = "template_category_update"
TEMPLATE_QUALITY_FIELD = "message_template_quality_update"
PAUSE_TITLES = {1: "FIRST_PAUSE", 2: "SECOND_PAUSE"}


def _template_ref(template_id: str, name: str, language: str) -> Dict[str, Any]:
    # an integer in these webhooks (Meta's reference), while the Graph list answers a string
    return {"message_template_id": int(template_id), "message_template_name": name, "message_template_language": language}


def template_status_value(
    *, template_id: str, name: str, language: str, event: str, reason: Optional[str], category: str,
    pauses: int = 0, unpaused: bool = False, now: int = 0,
) -> Dict[str, Any]:
    """`value` of a `message_template_status_update` change. Pauses and unpauses carry
    `other_info{title, description}`, disabling `disable_info{disable_date}`, as Meta sends them."""
    value: Dict[str, Any] = {"event": event, **_template_ref(template_id, name, language)}
    value["reason"] = reason if reason is not None else "NONE"
    value["message_template_category"] = category
    if event == "PAUSED":
        value["other_info"] = {
            "title": PAUSE_TITLES.get(pauses, "RATE_LIMITING_PAUSE"),
            "description": "Your WhatsApp message template has been paused because of low quality.",
        }
    elif event == "DISABLED":
        value["disable_info"] = {"disable_date": int(now)}
    elif unpaused:
        value["other_info"] = {"title": "UNPAUSE", "description": "Your WhatsApp message template has been unpaused."}
    return value


def template_category_value(*, template_id: str, name: str, language: str, previous: str, new: str) -> Dict[str, Any]:
    """`value` of a completed `template_category_update` change."""
    return {**_template_ref(template_id, name, language), "previous_category": previous, "new_category": new}


def template_quality_value(*, template_id: str, name: str, language: str, previous: str, new: str) -> Dict[str, Any]:
    """`value` of a `message_template_quality_update` change."""
    return {"previous_quality_score": previous, "new_quality_score": new, **_template_ref(template_id, name, language)}
