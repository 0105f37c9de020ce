"""Simulator settings: one frozen value built once, so handlers never read the environment."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple

DEFAULT_TEMPLATES = Path(__file__).with_name("templates.json")
DEFAULT_BOT_WEBHOOK = "http://127.0.0.1:5005/webhooks/whatsapp/webhook"
DEFAULT_PORT = 5090
KNOWN_STATUSES = ("sent", "delivered", "read")
WINDOW_MODES = ("async", "sync")
DEFAULT_REDELIVER_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it so the operator can fix it."""


@dataclass(frozen=True)
class Settings:
    """Everything a simulator instance needs; frozen because handlers share it across requests."""

    access_token: str
    phone_number_id: str
    app_secret: str
    display_phone_number: str = "15550001234"
    business_account_id: str = "102290129340398"
    bot_webhook_url: str = DEFAULT_BOT_WEBHOOK
    templates_path: Path = DEFAULT_TEMPLATES
    window_errors: str = "async"
    statuses: Tuple[str, ...] = KNOWN_STATUSES
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    webhook_timeout: float = 30.0
    status_delay: float = 0.0
    redeliver_delays: Tuple[float, ...] = DEFAULT_REDELIVER_DELAYS
    phone_number_ids: Tuple[str, ...] = ()  # further business numbers of the same app, beyond phone_number_id
    state_file: Optional[Path] = None  # where conversations and the clock persist across restarts; None: nowhere

    def __post_init__(self) -> None:
        for name in ("access_token", "phone_number_id", "app_secret"):
            if not getattr(self, name):
                raise SettingsError(f"missing required setting: {name}")
        if self.window_errors not in WINDOW_MODES:
            raise SettingsError(f"window_errors must be one of {WINDOW_MODES}, got {self.window_errors!r}")
        for status in self.statuses:
            if status not in KNOWN_STATUSES:
                raise SettingsError(f"statuses: unknown status {status!r} (known: {', '.join(KNOWN_STATUSES)})")
        check_delays(self.redeliver_delays)
        if len(set(self.business_numbers)) != len(self.business_numbers) or not all(self.business_numbers):
            raise SettingsError(f"phone_number_ids must be non-empty, unique and differ from phone_number_id, got {self.phone_number_ids!r}")

    @property
    def business_numbers(self) -> Tuple[str, ...]:
        """Every phone number id the Cloud API routes accept: the main one first."""
        return (self.phone_number_id, *self.phone_number_ids)

    def display_number(self, phone_number_id: str) -> str:
        """The display number in webhook `metadata`: the configured one for the main id, else derived
        from the id, so a number unknown here (another bot's) still looks plausible and stable."""
        if phone_number_id == self.phone_number_id:
            return self.display_phone_number
        digits = "".join(ch for ch in phone_number_id if ch.isdigit())
        return "1555000" + digits[-4:].rjust(4, "0")


def check_delays(delays: Tuple[float, ...]) -> None:
    for delay in delays:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < math.inf:
            raise SettingsError(f"redeliver_delays must be finite seconds >= 0, got {delay!r}")


def comma_list(text: str) -> Tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_statuses(text: Optional[str]) -> Tuple[str, ...]:
    """`"sent,delivered"` → `("sent", "delivered")`; empty means report nothing."""
    if text is None:
        return KNOWN_STATUSES
    return comma_list(text)


def parse_delays(text: Optional[str]) -> Tuple[float, ...]:
    """`"0.5,1,2"` → `(0.5, 1.0, 2.0)`; unset means Meta-like defaults, `""` or `"none"` never redeliver."""
    if text is None:
        return DEFAULT_REDELIVER_DELAYS
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(part) for part in comma_list(text))
    except ValueError:
        raise SettingsError(f"redeliver_delays must be comma-separated seconds, got {text!r}") from None


def env_default(name: str, default: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Read one env var, treating an empty value as unset (shell exports often leave them empty)."""
    value = (os.environ if env is None else env).get(name)
    return value if value else default
