"""A parsed WhatsApp message → what Rasa receives: the text (or `/intent` payload) and metadata.

Rasa answers 500 when a message without text reaches it, so a message that must not reach the
NLU (a revoke, an unsupported type, a reaction by default) yields None and the channel records
it instead of handing it on. What the customer meant as a message (media, a location, a contact
card, an order, a submitted Flow) becomes an intent payload that `InboundOptions` names: the
bot's domain must list those intents (and the location entities), or Rasa runs the NLU on the
literal `/whatsapp_...` string.

Edits (Coexistence numbers only) go to Rasa as the new text, with `metadata.whatsapp.edited_of`
naming the original wamid, so a corrected question gets an answer; `InboundOptions(edits=False)`
records them instead.
"""

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

from connector.payloads import InboundMessage

_INTENT = re.compile(r"/[^\s{}@/]+")


@dataclass(frozen=True)
class InboundOptions:
    """Which intent payload each non-text message type becomes; None sends that type nowhere
    (it is only recorded). Captions and typed text always reach Rasa as text."""

    media_intent: Optional[str] = "/whatsapp_media"
    location_intent: Optional[str] = "/whatsapp_location"
    contacts_intent: Optional[str] = "/whatsapp_contacts"
    order_intent: Optional[str] = "/whatsapp_order"
    flow_intent: Optional[str] = "/whatsapp_flow"
    reaction_intent: Optional[str] = None
    edits: bool = True

    def __post_init__(self) -> None:
        for option in fields(self):
            value = getattr(self, option.name)
            if option.name.endswith("_intent") and value is not None:
                if not isinstance(value, str) or not _INTENT.fullmatch(value):
                    raise ValueError(
                        f"WhatsApp inbound option {option.name!r} must be an intent payload "
                        f"like '/whatsapp_media', got {value!r}"
                    )

    @classmethod
    def text_only(cls) -> "InboundOptions":
        """Only what the customer typed or tapped reaches Rasa: for a domain without the
        `whatsapp_*` intents."""
        return cls(
            media_intent=None,
            location_intent=None,
            contacts_intent=None,
            order_intent=None,
            flow_intent=None,
            reaction_intent=None,
            edits=False,
        )


TEXT_ONLY = InboundOptions.text_only()


def rasa_text(message: InboundMessage, options: InboundOptions = TEXT_ONLY) -> Optional[str]:
    """Typed text, a caption, a tapped reply (its id when the bot set it to a `/intent`
    payload, so no NLU is needed, else the title the customer saw), or the intent payload
    `options` names for the message's type. None: record it, do not hand it to Rasa.

    Without `options`, only typed or tapped text gets through (the channel's behaviour before
    the other types were mapped); pass `InboundOptions()` for the full mapping."""
    if message.reply is not None:
        if message.reply.id.startswith("/"):
            return message.reply.id
        return message.reply.title or message.reply.id or None
    if message.edit is not None:
        return _clean(message.edit.text) if options.edits else None
    if _clean(message.text):
        return _clean(message.text)
    if message.media is not None:
        return options.media_intent
    if message.location is not None:
        location = message.location
        return _with_entities(options.location_intent, {
            "latitude": location.latitude,
            "longitude": location.longitude,
            "name": location.name,
            "address": location.address,
        })
    if message.contacts:
        return options.contacts_intent
    if message.order is not None:
        return options.order_intent
    if message.flow is not None:
        return options.flow_intent
    if message.reaction is not None and not message.reaction.removed:
        return options.reaction_intent
    return None


def rasa_metadata(message: InboundMessage) -> Dict[str, Any]:
    """`metadata.whatsapp` on the UserUttered event: the WhatsApp timestamp is what the care
    window is judged by (Rasa's own event timestamp is its processing time). Type-specific
    keys (media, location, contacts, order, reaction, flow, edited_of, referral, entry_point)
    appear only on messages that have them."""
    whatsapp: Dict[str, Any] = {
        "wamid": message.wamid,
        "type": message.type,
        "timestamp": message.timestamp,
        "phone_number_id": message.phone_number_id,
        "display_phone_number": message.display_phone_number,
        "wa_id": message.wa_id,
        "user_id": message.user_id,
        "parent_user_id": message.parent_user_id,
        "username": message.username,
        "profile_name": message.profile_name,
        "context": _context(message),
        "reply": asdict(message.reply) if message.reply else None,
    }
    media = message.edit.media if message.edit is not None else message.media
    if media is not None:
        whatsapp["media"] = {
            "id": media.id,
            "mime_type": media.mime_type,
            "sha256": media.sha256,
            "filename": media.filename,
            "url": media.url,
            "voice": media.voice,
            "animated": media.animated,
        }
    if message.location is not None:
        whatsapp["location"] = asdict(message.location)
    if message.contacts:
        whatsapp["contacts"] = [
            {
                "name": card.name,
                "phones": [asdict(phone) for phone in card.phones],
                "emails": list(card.emails),
                "organization": card.organization,
            }
            for card in message.contacts
        ]
    if message.order is not None:
        whatsapp["order"] = {
            "catalog_id": message.order.catalog_id,
            "text": message.order.text,
            "product_items": [asdict(item) for item in message.order.items],
        }
    if message.reaction is not None:
        whatsapp["reaction"] = {"message_id": message.reaction.message_id, "emoji": message.reaction.emoji}
    if message.flow is not None:
        whatsapp["flow"] = {"name": message.flow.name, "body": message.flow.body, "response": dict(message.flow.response)}
    if message.edit is not None:
        whatsapp["edited_of"] = message.edit.original_message_id
    if message.referral is not None:
        whatsapp["referral"] = asdict(message.referral)
        whatsapp["entry_point"] = "ctwa"
    return {"whatsapp": whatsapp}


def _with_entities(intent: Optional[str], entities: Dict[str, Any]) -> Optional[str]:
    """Rasa's payload syntax `/intent{"entity": value}`; JSON keeps quotes, braces and
    newlines in a place name from breaking it."""
    if intent is None:
        return None
    present = {key: value for key, value in entities.items() if value is not None}
    return f"{intent}{json.dumps(present)}" if present else intent


def _clean(text: Optional[str]) -> Optional[str]:
    return text.strip() or None if text else None


def _context(message: InboundMessage) -> Optional[Dict[str, Any]]:
    if message.context is None:
        return None
    context: Dict[str, Any] = {
        "message_id": message.context.message_id,
        "from": message.context.from_,
        "forwarded": message.context.forwarded,
        "frequently_forwarded": message.context.frequently_forwarded,
    }
    if message.context.product_retailer_id:
        context["referred_product"] = {
            "catalog_id": message.context.catalog_id,
            "product_retailer_id": message.context.product_retailer_id,
        }
    return context
