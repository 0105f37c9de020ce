"""The channel's settings, read once from its block in credentials.yml and validated at startup.

A typo or an empty environment variable should stop `rasa run` with the bad key's name, not
surface hours later as a 401 from Meta.
"""

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

DEFAULT_API_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v23.0"

_REQUIRED = ("access_token", "phone_number_id", "app_secret", "verify_token")
_OPTIONAL = ("api_url", "api_version", "request_timeout")
_API_VERSION = re.compile(r"^v\d+\.\d+$")


class ConfigError(ValueError):
    """A setting in the channel's credentials block is missing or malformed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"WhatsApp channel setting '{key}' {problem} (credentials.yml)")
        self.key = key


@dataclass(frozen=True)
class ChannelConfig:
    access_token: str
    phone_number_id: str
    app_secret: str
    verify_token: str
    api_url: str = DEFAULT_API_URL
    api_version: str = DEFAULT_API_VERSION
    request_timeout: float = 10.0

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

        values = {key: _required_text(credentials, key) for key in _REQUIRED}
        if not values["phone_number_id"].isdigit():
            raise ConfigError("phone_number_id", "must be the numeric id Meta shows, not the phone number")

        api_url = _optional_text(credentials, "api_url") or DEFAULT_API_URL
        parsed = urlparse(api_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError("api_url", f"must be an http(s) URL, got {api_url!r}")
        api_version = _optional_text(credentials, "api_version") or DEFAULT_API_VERSION
        if not _API_VERSION.match(api_version):
            raise ConfigError("api_version", f"must look like 'v23.0', got {api_version!r}")

        timeout = credentials.get("request_timeout", cls.request_timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 30:
            raise ConfigError("request_timeout", f"must be a number of seconds in (0, 30], got {timeout!r}")

        return cls(
            **values,
            api_url=api_url.rstrip("/"),
            api_version=api_version,
            request_timeout=float(timeout),
        )


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
