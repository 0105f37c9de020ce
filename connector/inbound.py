"""A parsed WhatsApp message → what Rasa receives: the text (or `/intent` payload) and metadata.

Rasa answers 500 when a message without text reaches it, so a message this module cannot turn
into text yields None and the channel records it instead of handing it on.
"""

from dataclasses import asdict
from typing import Any, Dict, Optional

from connector.payloads import InboundMessage


def rasa_text(message: InboundMessage) -> Optional[str]:
    """Typed text, a caption, or a tapped reply: its id when the bot set it to a `/intent`
    payload (so no NLU is needed), else the title the customer saw."""
    if message.reply is not None:
        if message.reply.id.startswith("/"):
            return message.reply.id
        return message.reply.title or message.reply.id or None
    if message.text is None:
        return None
    return message.text.strip() or None


def rasa_metadata(message: InboundMessage) -> Dict[str, Any]:
    """`metadata.whatsapp` on the UserUttered event: the WhatsApp timestamp is what the care
    window is judged by (Rasa's own event timestamp is its processing time)."""
    whatsapp: Dict[str, Any] = {
        "wamid": message.wamid,
        "type": message.type,
        "timestamp": message.timestamp,
        "phone_number_id": message.phone_number_id,
        "display_phone_number": message.display_phone_number,
        "wa_id": message.wa_id,
        "user_id": message.user_id,
        "profile_name": message.profile_name,
        "context": _context(message),
        "reply": asdict(message.reply) if message.reply else None,
    }
    return {"whatsapp": whatsapp}


def _context(message: InboundMessage) -> Optional[Dict[str, Any]]:
    if message.context is None:
        return None
    return {
        "message_id": message.context.message_id,
        "from": message.context.from_,
        "forwarded": message.context.forwarded,
        "frequently_forwarded": message.context.frequently_forwarded,
    }
