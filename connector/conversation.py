"""A conversation as a person reads it: both directions, oldest first.

The customer's messages come from the tracker (the source of truth); what went out comes from the
outbound records, which know what the tracker does not: whether a reply went free-form, became a
template or was suppressed, and what Meta made of it.
"""

from typing import Any, Dict, Iterable, List, Mapping, Optional

from rasa.shared.core.events import UserUttered

from connector.care_state import OutboundRecord
from connector.decisions import outcome

_DATA_KEYS = ("media", "location", "contacts", "reply", "order", "reaction", "flow")


def customer_message(event: UserUttered) -> Optional[Dict[str, Any]]:
    """What the customer sent, from its `UserUttered`; None for external events (reminders)."""
    metadata = event.metadata or {}
    whatsapp = metadata.get("whatsapp")
    if metadata.get("is_external") or not isinstance(whatsapp, Mapping):
        return None
    message: Dict[str, Any] = {
        "wamid": event.message_id or whatsapp.get("wamid"),
        "type": whatsapp.get("type"),
        "text": said(event.text, whatsapp),
        "timestamp": whatsapp.get("timestamp"),
    }
    message.update({key: whatsapp[key] for key in _DATA_KEYS if whatsapp.get(key)})
    return message


def said(text: Optional[str], whatsapp: Mapping[str, Any]) -> Optional[str]:
    """The customer's own words: what they typed or tapped, not the intent payload Rasa got."""
    reply = whatsapp.get("reply")
    if whatsapp.get("typed"):
        return str(whatsapp["typed"])
    if isinstance(reply, Mapping) and reply.get("title"):
        return str(reply["title"])
    if whatsapp.get("opt_out_keyword"):
        return str(whatsapp["opt_out_keyword"])
    return None if not text or text.startswith("/") else text


def history(events: Iterable[Any], records: Iterable[OutboundRecord], limit: int) -> List[Dict[str, Any]]:
    """The latest `limit` messages, oldest first."""
    messages = []
    for event in events:
        if isinstance(event, UserUttered):
            message = customer_message(event)
            if message is not None:
                messages.append({"at": message["timestamp"], "direction": "in", "by": "customer", **message})
    for record in records:
        shown = record.rendered_with or {}
        messages.append({
            "at": record.at, "direction": "out", "by": "agent" if shown.get("agent") else "bot",
            "type": "template" if record.decision == "template" else _type(shown),
            "text": shown.get("text"), "template": record.template, "response": record.response,
            "decision": outcome(record), "status": record.status, "reason": record.reason,
            "reason_code": record.reason_code, "code": record.error_code, "wamid": record.wamid,
        })
    messages.sort(key=lambda message: message["at"] or 0)
    return messages[-limit:]


def _type(shown: Mapping[str, Any]) -> str:
    for key in ("image", "attachment", "custom", "elements"):
        if shown.get(key):
            return key
    return "interactive" if shown.get("buttons") or shown.get("quick_replies") else "text"
