"""Simulator settings: one frozen value built once, so handlers never read the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple

DEFAULT_TEMPLATES = Path(__file__).with_name("templates.json")
DEFAULT_BOT_WEBHOOK = "http://127.0.0.1:5005/webhooks/whatsapp/webhook"
DEFAULT_PORT = 5090
KNOWN_STATUSES = ("sent", "delivered", "read")
WINDOW_MODES = ("async", "sync")


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

    def __post_init__(self) -> None:
        for name in ("access_token", "phone_number_id", "app_secret"):
            if not getattr(self, name):
                raise SettingsError(f"missing required setting: {name}")
        if self.window_errors not in WINDOW_MODES:
            raise SettingsError(f"window_errors must be one of {WINDOW_MODES}, got {self.window_errors!r}")
        for status in self.statuses:
            if status not in KNOWN_STATUSES:
                raise SettingsError(f"statuses: unknown status {status!r} (known: {', '.join(KNOWN_STATUSES)})")


def parse_statuses(text: Optional[str]) -> Tuple[str, ...]:
    """`"sent,delivered"` → `("sent", "delivered")`; empty means report nothing."""
    if text is None:
        return KNOWN_STATUSES
    return tuple(part.strip() for part in text.split(",") if part.strip())


def env_default(name: str, default: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Read one env var, treating an empty value as unset (shell exports often leave them empty)."""
    value = (os.environ if env is None else env).get(name)
    return value if value else default
