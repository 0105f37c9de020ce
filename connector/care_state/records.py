"""The typed records the care-window state keeps per customer and per outbound message."""

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

# A status only moves forward: a late "delivered" never overwrites "read" (Meta does not order
# its webhooks), and "failed" is final.
STATUS_RANK = {"sending": 0, "accepted": 1, "unknown": 1, "suppressed": 5, "sent": 2, "delivered": 3,
               "read": 4, "failed": 5}
SENT_STATUSES = ("sent", "delivered", "read")


@dataclass(frozen=True)
class CustomerState:
    """What every instance must agree on about one customer."""

    sender_id: str
    last_inbound_at: Optional[int] = None
    """WhatsApp timestamp of the customer's latest message, as written when its webhook arrived."""
    reply_number: Optional[str] = None
    """The business number (phone_number_id) that customer last wrote to."""
    closed_for_inbound: Optional[int] = None
    """Meta said (131047) the window opened by the message at this timestamp is closed."""
    opt_out_pending: bool = False
    """The customer opted out and the tracker store does not hold it yet: counts as opted out."""


@dataclass(frozen=True)
class OutboundRecord:
    """One WhatsApp message the channel decided about, keyed by the callback id it carries in
    `biz_opaque_callback_data` (so a status ties back to it even when the send's answer was lost)."""

    callback_id: str
    sender_id: str
    decision: str
    """free_form, template or suppressed."""
    window_of: int
    """The customer's last message (WhatsApp timestamp, 0 for never) when this was decided."""
    at: float
    """The channel's clock (the simulator's, in tests) when decided."""
    created_at: float
    """The system clock, for ordering a customer's records across instances."""
    response: Optional[str] = None
    template: Optional[str] = None
    rendered_with: Mapping[str, Any] = field(default_factory=dict)
    """The bot message's own keys, so that a fallback can be rendered from it later."""
    choices: Tuple[Tuple[str, str], ...] = ()
    """Numbered options this message offered as text ("1" -> payload)."""
    wamid: Optional[str] = None
    status: str = "sending"
    error_code: Optional[int] = None
    reason: Optional[str] = None
    reason_code: Optional[str] = None
    """A suppression's code (a `window.SuppressReason` value such as `no_opt_in`), stored with the
    record: the decision log, the conversation views and the agent API read it from here.
    None for what was not suppressed, and for records stored before the code was kept."""
    fallback_of: Optional[str] = None
    """The callback id of the message this one stands in for (a 131047 fallback)."""

    @property
    def status_rank(self) -> int:
        return STATUS_RANK[self.status]


@dataclass(frozen=True)
class StatusWritten:
    """What one status webhook's write did (`CareStateBackend.record_status`)."""

    changed: bool
    """This call moved the record forward (so exactly one caller acts on it)."""
    record: Optional[OutboundRecord] = None
    """The record as changed, when it changed and was asked for (`fetch`)."""
    first_pricing: bool = False
    """The pricing given was the first stored for the message (a later status repeats it)."""


def dump_json(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def choices_from_json(raw: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    return tuple((str(n), str(p)) for n, p in json.loads(raw)) if raw else ()


@dataclass(frozen=True)
class PendingTurn:
    """One customer message (or call) acknowledged to Meta: kept until Rasa has saved its turn,
    so a crash, a failed turn or a deploy cannot lose it. Keyed by the wamid, which Rasa stores
    as the `UserUttered`'s message_id."""

    key: str
    sender_id: str
    text: str
    metadata: Mapping[str, Any]
    """The `UserMessage` metadata (`{"whatsapp": {...}}`)."""
    timestamp: int
    """WhatsApp's, for the care window."""
    phone_number_id: str
    """The business number the customer wrote to: the reply leaves from it."""
    received_at: float
    """The system clock when acknowledged: a customer's turns run in this order."""
    state: str = "pending"
    """pending, done or failed."""
    attempts: int = 0
    """Attempts that failed so far."""
    error: Optional[str] = None


@dataclass(frozen=True)
class Handoff:
    """A conversation with a person: the shared registry that lets any instance find the paused
    conversations (the desk's list, the window-closing warning) without reading every tracker."""

    sender_id: str
    since: float
    """The channel's clock when the conversation was handed off."""
    reason: Optional[str] = None
    closing_sent_for: Optional[int] = None
    """The window (customer message timestamp) whose `window_closing` event was already made."""
    last_inbound_at: Optional[int] = None
    """Read with it from the customer's state: the window the warning is about."""


@dataclass(frozen=True)
class DeskEvent:
    """One event for the desk's webhook, kept until the desk took it: a desk that is down loses
    nothing. A customer's events go out one at a time in `seq` order."""

    event_id: str
    """Stable for what it reports (a retried turn makes the same id), so it is stored once."""
    sender_id: str
    body: Mapping[str, Any]
    """The JSON the desk receives."""
    created_at: float
    seq: int = 0
    """Given by the backend when stored: the customer's order."""
    attempts: int = 0
    next_attempt_at: float = 0.0
    error: Optional[str] = None


@dataclass(frozen=True)
class TemplateState:
    """A template (in one language) as Meta last said it is: from the sync, its webhooks, or a
    send refused with 132015/132016. Shared, so every instance stops sending a paused one."""

    name: str
    language: str
    status: str
    """APPROVED, PAUSED, DISABLED, REJECTED, PENDING..."""
    category: str = ""
    """UTILITY, MARKETING, AUTHENTICATION."""
    updated_at: float = 0.0
    """When Meta said so (its webhook's time, or the sync's clock): a later word wins."""


@dataclass(frozen=True)
class Pricing:
    """What Meta says a message costs, from its status webhooks' `pricing`."""

    category: Optional[str]
    """service, utility, marketing, authentication..."""
    billable: Optional[bool]
    pricing_type: Optional[str] = None
    """regular, free_customer_service, free_entry_point..."""
