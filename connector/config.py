"""The channel's settings, read once from its block in credentials.yml and validated at startup.

A typo or an empty environment variable should stop `rasa run` with the bad key's name, not
surface hours later as a 401 from Meta.
"""

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlparse

from connector.inbound import InboundOptions
from connector.templates import InvalidTemplate, TemplateBook
from connector.window import CareWindowPolicy

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v23.0"

_REQUIRED = ("access_token", "phone_number_id", "app_secret", "verify_token")
_OPTIONAL = (
    "api_url",
    "api_version",
    "request_timeout",
    "templates",
    "fallback_template",
    "care_window_margin_seconds",
    "templates_per_lapsed_window",
    "opt_in_slot",
    "opt_in_collected_elsewhere",
    "opt_out_keywords",
    "opt_out_intent",
    "api_token",
    "simulator_clock_url",
    "inbound_intents",
    "redis_url",
    "max_in_flight",
    "turn_attempts",
    "shutdown_deadline_seconds",
    "mark_read",
    "typing_indicator",
    "freeze_startup_heap",
    "pacing",
    "retry_budget_seconds",
    "max_body_bytes",
    "agent_token",
    "handoff_webhook_url",
    "window_closing_lead_minutes",
    "desk_backlog_limit",
    "resume_intent",
    "whatsapp_business_account_id",
    "template_sync_minutes",
)
_INBOUND_INTENTS = ("media", "location", "contacts", "order", "flow", "reaction", "call")
_PACING = {  # key: (default, low, high, whole number)
    "messages_per_second": (80.0, 0, 1000, False),
    "customer_burst": (30, 1, 1000, True),
    "customer_interval": (6.0, 0, 60, False),
    "customer_min_gap": (0.0, 0, 60, False),
    "max_wait": (10.0, 0, 30, False),
}
_API_VERSION = re.compile(r"^v\d+\.\d+$")


class ConfigError(ValueError):
    """A setting in the channel's credentials block is missing or malformed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"WhatsApp channel setting '{key}' {problem} (credentials.yml)")
        self.key = key


@dataclass(frozen=True)
class ChannelConfig:
    access_token: str
    phone_number_ids: Tuple[str, ...]
    """The business numbers this bot serves; webhooks for any other number are not its own."""
    app_secret: str
    verify_token: str
    api_url: str = DEFAULT_API_URL
    api_version: str = DEFAULT_API_VERSION
    request_timeout: float = 10.0
    templates: TemplateBook = field(default_factory=lambda: TemplateBook({}))
    care_window: CareWindowPolicy = CareWindowPolicy()
    opt_in_slot: str = "whatsapp_opt_in"
    opt_out_keywords: Tuple[str, ...] = ("STOP", "UNSUBSCRIBE")
    opt_out_intent: str = "opt_out"
    api_token: str = ""
    """Bearer token for GET /webhooks/whatsapp/conversations/{sender_id}; the route is off without it."""
    simulator_clock_url: str = ""
    """Tests and demos only: read "now" from the simulator's controllable clock."""
    inbound: InboundOptions = InboundOptions()
    call_intent: Optional[str] = "/whatsapp_call"
    """A customer's call reaches Rasa as this intent (and so restarts the care window)."""
    max_in_flight: int = 200
    """Customer messages accepted and not yet handled, per instance; past it the webhook is 503."""
    turn_attempts: int = 8
    """Attempts of a turn that fails (action server down, Rasa raised) before it is given up."""
    shutdown_deadline_seconds: float = 20.0
    """How long in-flight turns may finish after SIGTERM; the rest stays pending for recovery."""
    mark_read: bool = True
    typing_indicator: bool = True
    freeze_startup_heap: bool = True
    """gc.freeze() once Rasa's model is loaded (see `WhatsAppInput.open_state`)."""
    pacing: Mapping[str, float] = field(default_factory=lambda: {k: v[0] for k, v in _PACING.items()})
    retry_budget_seconds: float = 15.0
    max_body_bytes: int = 1_048_576
    agent_token: str = ""
    """Bearer token of the agent API (/webhooks/whatsapp/agent/...) and the key that signs desk
    events; the agent API is off without it."""
    handoff_webhook_url: str = ""
    """Where the desk receives handoff events; none are kept without it."""
    window_closing_lead_seconds: float = 3600.0
    """How long before a handed-off conversation's window lapses the desk is warned."""
    desk_backlog_limit: int = 1000
    """Undelivered desk events kept per customer while the desk is down; past it new ones are dropped (logged)."""
    resume_intent: Optional[str] = None
    """Triggered after an agent hands a conversation back, so the bot can say it is back."""
    whatsapp_business_account_id: str = ""
    """With it, the `templates` mapping is checked at startup against the templates Meta holds."""
    template_sync_seconds: float = 3600.0
    """How often Meta's templates are read again (their webhooks update them in between)."""

    @property
    def phone_number_id(self) -> str:
        """The number messages leave from when the customer's own is not known."""
        return self.phone_number_ids[0]

    @property
    def messages_url(self) -> str:
        return f"{self.api_url}/{self.api_version}/{self.phone_number_id}/messages"

    @classmethod
    def from_credentials(cls, credentials: Optional[Mapping[str, Any]]) -> "ChannelConfig":
        if not credentials:
            raise ConfigError(_REQUIRED[0], "is missing: the channel block is empty")
        unknown = sorted(set(credentials) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ConfigError(unknown[0], f"is unknown; known keys: {', '.join(_REQUIRED + _OPTIONAL)}")

        values = {key: _required_text(credentials, key) for key in _REQUIRED if key != "phone_number_id"}
        numbers = _phone_number_ids(credentials.get("phone_number_id"))

        api_url = _optional_text(credentials, "api_url") or DEFAULT_API_URL
        parsed = urlparse(api_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError("api_url", f"must be an http(s) URL, got {api_url!r}")
        api_version = _optional_text(credentials, "api_version") or DEFAULT_API_VERSION
        if not _API_VERSION.match(api_version):
            raise ConfigError("api_version", f"must look like 'v23.0', got {api_version!r}")

        timeout = _number(credentials, "request_timeout", 10.0, 0, 30)
        try:
            templates = TemplateBook.parse(credentials.get("templates"), credentials.get("fallback_template"))
        except InvalidTemplate as invalid:
            raise ConfigError(invalid.key, invalid.problem) from None
        care_window = CareWindowPolicy(
            margin_seconds=_number(credentials, "care_window_margin_seconds", 60.0, 0, 3600, allow_zero=True),
            templates_per_lapsed_window=int(_number(credentials, "templates_per_lapsed_window", 1, 0, 100, allow_zero=True, whole=True)),
            opt_in_collected_elsewhere=_flag(credentials, "opt_in_collected_elsewhere"),
        )
        keywords = credentials.get("opt_out_keywords", list(cls.opt_out_keywords))
        if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
            raise ConfigError("opt_out_keywords", "must be a list of words, e.g. [STOP, UNSUBSCRIBE]")
        clock_url = _optional_text(credentials, "simulator_clock_url")
        if clock_url and urlparse(clock_url).scheme not in ("http", "https"):
            raise ConfigError("simulator_clock_url", f"must be an http(s) URL, got {clock_url!r}")
        if clock_url and parsed.hostname and parsed.hostname.endswith("facebook.com"):
            raise ConfigError("simulator_clock_url", "time travel exists only with the simulator, and api_url "
                              f"points at Meta ({api_url}); leave simulator_clock_url empty for a real number")

        intents = _inbound_intents(credentials.get("inbound_intents"))
        redis_url = _optional_text(credentials, "redis_url")
        if redis_url:
            logger.warning("WhatsApp channel setting 'redis_url' is no longer used: duplicates are now detected in the "
                           "inbox, which lives with the tracker store and is shared by every instance; remove it")
        agent_token = _optional_text(credentials, "agent_token")
        desk_url = _optional_text(credentials, "handoff_webhook_url")
        if desk_url and (urlparse(desk_url).scheme not in ("http", "https") or not urlparse(desk_url).netloc):
            raise ConfigError("handoff_webhook_url", f"must be an http(s) URL, got {desk_url!r}")
        if desk_url and not agent_token:
            raise ConfigError("agent_token", "is needed with handoff_webhook_url: it signs the desk's events")
        resume_intent = _optional_text(credentials, "resume_intent") or None
        if resume_intent and not re.fullmatch(r"[^\s{}@/]+", resume_intent):
            raise ConfigError("resume_intent", f"must be an intent name of the domain (no slash), got {resume_intent!r}")
        waba_id = _optional_text(credentials, "whatsapp_business_account_id")
        if waba_id and not waba_id.isdigit():
            raise ConfigError("whatsapp_business_account_id", f"must be the numeric id Meta shows, got {waba_id!r}")
        pacing = credentials.get("pacing") or {}
        if not isinstance(pacing, Mapping) or set(pacing) - set(_PACING):
            unknown = sorted(set(pacing) - set(_PACING)) if isinstance(pacing, Mapping) else []
            raise ConfigError(f"pacing.{unknown[0]}" if unknown else "pacing", f"takes {', '.join(_PACING)}")

        return cls(
            **values,
            inbound=InboundOptions(**{f"{k}_intent": v for k, v in intents.items() if k != "call"}),
            call_intent=intents["call"],
            phone_number_ids=numbers,
            max_in_flight=int(_number(credentials, "max_in_flight", 200, 1, 100_000, whole=True)),
            turn_attempts=int(_number(credentials, "turn_attempts", 8, 1, 20, whole=True)),
            shutdown_deadline_seconds=_number(credentials, "shutdown_deadline_seconds", 20.0, 0, 600, allow_zero=True),
            mark_read=_flag(credentials, "mark_read", True),
            typing_indicator=_flag(credentials, "typing_indicator", True),
            freeze_startup_heap=_flag(credentials, "freeze_startup_heap", True),
            pacing={
                key: _number(pacing, key, default, low, high, allow_zero=True, whole=whole, name=f"pacing.{key}")
                for key, (default, low, high, whole) in _PACING.items()
            },
            retry_budget_seconds=_number(credentials, "retry_budget_seconds", 15.0, 0, 45, allow_zero=True),
            max_body_bytes=int(_number(credentials, "max_body_bytes", 1_048_576, 1024, 64 * 1_048_576, whole=True)),
            api_url=api_url.rstrip("/"),
            api_version=api_version,
            request_timeout=timeout,
            templates=templates,
            care_window=care_window,
            opt_in_slot=_optional_text(credentials, "opt_in_slot") or cls.opt_in_slot,
            opt_out_keywords=tuple(k.strip().upper() for k in keywords),
            opt_out_intent=_optional_text(credentials, "opt_out_intent") or cls.opt_out_intent,
            api_token=_optional_text(credentials, "api_token"),
            simulator_clock_url=clock_url,
            agent_token=agent_token,
            handoff_webhook_url=desk_url,
            window_closing_lead_seconds=60 * _number(credentials, "window_closing_lead_minutes", 60, 0, 1439, allow_zero=True),
            desk_backlog_limit=int(_number(credentials, "desk_backlog_limit", 1000, 1, 1_000_000, whole=True)),
            resume_intent=resume_intent,
            whatsapp_business_account_id=waba_id,
            template_sync_seconds=60 * _number(credentials, "template_sync_minutes", 60, 1, 7 * 24 * 60),
        )


def _phone_number_ids(raw: Any) -> Tuple[str, ...]:
    """One id, a list, or (from an environment variable) ids separated by commas."""
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        raw = [part for part in str(raw).split(",") if part.strip()]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("phone_number_id", "is missing or empty: give the id Meta shows, or a list of them")
    numbers = tuple(str(number).strip() for number in raw if not isinstance(number, bool))
    if len(numbers) != len(raw) or not all(number.isdigit() for number in numbers):
        raise ConfigError("phone_number_id", f"must be the numeric id(s) Meta shows, not phone numbers; got {raw!r}")
    return tuple(dict.fromkeys(numbers))


def _inbound_intents(raw: Any) -> Dict[str, Optional[str]]:
    """Which intent each non-text message type becomes; null or "" only records that type."""
    defaults = InboundOptions()
    intents: Dict[str, Optional[str]] = {k: getattr(defaults, f"{k}_intent", None) for k in _INBOUND_INTENTS}
    intents["call"] = ChannelConfig.call_intent
    if raw is None:
        return intents
    if not isinstance(raw, Mapping):
        raise ConfigError("inbound_intents", f"must map {', '.join(_INBOUND_INTENTS)} to /intent payloads")
    for key, value in raw.items():
        if key not in _INBOUND_INTENTS:
            raise ConfigError(f"inbound_intents.{key}", f"is unknown; known: {', '.join(_INBOUND_INTENTS)}")
        value = value or None
        if value is not None and (not isinstance(value, str) or not re.fullmatch(r"/[^\s{}@/]+", value)):
            raise ConfigError(f"inbound_intents.{key}", f"must be an intent payload like /whatsapp_{key}, got {value!r}")
        intents[key] = value
    return intents


def _number(
    credentials: Mapping[str, Any], key: str, default: float, low: float, high: float,
    allow_zero: bool = False, whole: bool = False, name: Optional[str] = None,
) -> float:
    value = credentials.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not whole or float(value).is_integer())
    if not ok or not (low <= value <= high) or (value == 0 and not allow_zero):
        kind = "a whole number" if whole else "a number"
        bounds = f"[{low}, {high}]" if allow_zero else f"({low}, {high}]"
        raise ConfigError(name or key, f"must be {kind} in {bounds}, got {value!r}")
    return float(value)


def _flag(credentials: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = credentials.get(key, default)
    if value in ("true", "false"):  # ${ENV} values arrive as strings
        return value == "true"
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _required_text(credentials: Mapping[str, Any], key: str) -> str:
    value = _optional_text(credentials, key)
    if not value:
        raise ConfigError(key, "is missing or empty")
    return value


def _optional_text(credentials: Mapping[str, Any], key: str) -> str:
    value = credentials.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(key, f"must be a string, got {type(value).__name__}")
    return str(value).strip()
