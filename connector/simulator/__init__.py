"""A local stand-in for Meta's WhatsApp Cloud API, so tests and demos never call Meta.

It answers the Graph send API like Meta (limits, error codes, the 24-hour care window), plays
customers to the bot as signed Meta-shaped webhooks, and reports message statuses back.
Imports neither Rasa nor Sanic, so it starts in well under a second.
"""

from .server import create_app
from .settings import Settings, SettingsError

__all__ = ["create_app", "Settings", "SettingsError"]
