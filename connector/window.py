"""The customer care window decision: pure, no I/O, time passed in.

WhatsApp's rules: a window opens when the customer writes and ends 24 h after their LAST message
(WhatsApp's timestamp). Inside it anything may be sent. Outside it only an approved template may
go out, one per lapsed window, and only to a customer who opted in. Everything that may not go
out is suppressed with a reason, so it can be recorded: a code from a small fixed set
(`SuppressReason`, for metrics, logs and the agent API) and a sentence for people.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from connector.templates import MissingParameter, TemplateBook

CARE_WINDOW_SECONDS = 24 * 60 * 60


@dataclass(frozen=True)
class CareWindowPolicy:
    margin_seconds: float = 60.0
    """Treat the window as closed this long before its end: a message sent in the last
    seconds may reach Meta after the deadline."""
    templates_per_lapsed_window: int = 1
    opt_in_collected_elsewhere: bool = False
    """Opt-in was collected outside the bot: templates may go out unless the slot says False."""


@dataclass(frozen=True)
class WindowFacts:
    """What the care-window state, the tracker store and the turn in flight say about one customer."""

    last_inbound_at: Optional[float]
    """WhatsApp timestamp of the customer's latest message; None if they never wrote."""
    closed_for_inbound: Optional[float] = None
    """Meta answered 131047 to a message that answered the customer's message of this timestamp:
    that window is closed, whatever the clocks say; a newer customer message opens a new one."""
    templates_sent: int = 0
    """Templates reserved since the window lapsed (reset by every customer message)."""
    opt_in: Optional[bool] = None
    unknown: Optional[str] = None
    """Why the state could not be read (store down): then nothing is provably allowed."""

    def expires_at(self, now: float) -> Optional[float]:
        """End of the window; a timestamp from the future (clock skew) counts as now."""
        if self.last_inbound_at is None:
            return None
        return min(self.last_inbound_at, now) + CARE_WINDOW_SECONDS

    def is_open(self, now: float, policy: CareWindowPolicy) -> bool:
        if self.unknown or self.last_inbound_at is None:
            return False
        if self.closed_for_inbound is not None and self.closed_for_inbound >= self.last_inbound_at:
            return False
        return now < self.expires_at(now) - policy.margin_seconds


@dataclass(frozen=True)
class Outbound:
    """One bot message as the window sees it."""

    response: Optional[str]
    """Rasa's response name (`utter_action`); None for free text from an action or an agent."""
    template: Optional[Mapping[str, Any]] = None
    """The message's own WhatsApp template object, when it already is one (`custom`)."""
    values: Mapping[str, Any] = field(default_factory=dict)
    """Slot values and the message's own keys, for template parameters."""


@dataclass(frozen=True)
class SendFreeForm:
    kind = "free_form"


@dataclass(frozen=True)
class SendTemplate:
    name: str
    language: str
    components: Tuple[Dict[str, Any], ...]
    stands_in: Optional[str] = None
    """Why this (fallback) template goes out instead of the mapped one."""
    kind = "template"

    def message(self) -> Dict[str, Any]:
        """The WhatsApp message object for the send API."""
        template: Dict[str, Any] = {"name": self.name, "language": {"code": self.language}}
        if self.components:
            template["components"] = [dict(component) for component in self.components]
        return {"type": "template", "template": template}


class SuppressReason(str, Enum):
    """Why a bot message was suppressed: a small fixed set, so it can label a metric. The
    sentence beside it (`Suppress.reason`) says the details (names, numbers) for people."""

    NO_OPT_IN = "no_opt_in"
    """Outside the window and the customer has not opted in to templates."""
    TEMPLATE_LIMIT = "template_limit"
    """Outside the window and the lapsed window's templates are used up (one per lapsed window)."""
    NO_TEMPLATE = "no_template"
    """Outside the window and no template is mapped for the response (nor a fallback)."""
    TEMPLATE_UNFILLABLE = "template_unfillable"
    """Outside the window and the template's parameters cannot all be filled."""
    TEMPLATE_UNAVAILABLE = "template_unavailable"
    """Outside the window and the template is PAUSED, DISABLED or REJECTED at Meta."""
    MARKETING_STOPPED = "marketing_stopped"
    """Outside the window, the template is MARKETING and the customer stopped marketing messages."""
    STATE_UNKNOWN = "state_unknown"
    """The care-window state could not be read, or a template reservation written: nothing is
    provably allowed (worth a retry)."""


@dataclass(frozen=True)
class Suppress:
    code: SuppressReason
    reason: str
    kind = "suppressed"


Decision = Union[SendFreeForm, SendTemplate, Suppress]


def decide(
    now: float,
    facts: WindowFacts,
    outbound: Outbound,
    templates: TemplateBook,
    policy: CareWindowPolicy,
) -> Decision:
    if facts.is_open(now, policy):
        return SendFreeForm()
    if facts.unknown:
        return Suppress(SuppressReason.STATE_UNKNOWN, f"care window unknown: {facts.unknown}")

    mapping = None
    if outbound.template is None:
        mapping = templates.for_response(outbound.response)
        if mapping is None:
            what = outbound.response or "a message without a response name"
            return Suppress(SuppressReason.NO_TEMPLATE, f"outside the care window and no template is mapped for {what}")

    opted_in = facts.opt_in is True or (policy.opt_in_collected_elsewhere and facts.opt_in is not False)
    if not opted_in:
        return Suppress(SuppressReason.NO_OPT_IN, "outside the care window and the customer has not opted in")
    if facts.templates_sent >= policy.templates_per_lapsed_window:
        return Suppress(
            SuppressReason.TEMPLATE_LIMIT,
            f"outside the care window and {facts.templates_sent} template(s) already sent "
            f"since it lapsed (limit {policy.templates_per_lapsed_window})"
        )
    if mapping is None:  # the message is itself a template
        language = outbound.template.get("language")
        return SendTemplate(
            name=str(outbound.template.get("name")),
            language=str(language.get("code") if isinstance(language, Mapping) else language),
            components=tuple(outbound.template.get("components") or ()),
        )
    try:
        components = mapping.components(outbound.values)
    except MissingParameter as missing:
        return Suppress(SuppressReason.TEMPLATE_UNFILLABLE,
                        f"outside the care window and template {mapping.name} cannot be filled: {missing}")
    return SendTemplate(mapping.name, mapping.language, components)
