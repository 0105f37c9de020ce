"""The real PostgreSQL and Redis the multi-instance tests need. URLs come from the environment
(local defaults); when a service is missing the tests fail, they never skip."""

import os
from urllib.parse import urlparse

POSTGRES_URL = os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def postgres_settings() -> dict:
    """POSTGRES_URL as Rasa's SQLTrackerStore keyword arguments."""
    url = urlparse(POSTGRES_URL)
    return {
        "dialect": "postgresql",
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 5432,
        "db": url.path.lstrip("/") or "test",
        "username": url.username,
        "password": url.password,
    }


def redis_settings() -> dict:
    url = urlparse(REDIS_URL)
    return {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 6379,
        "db": int(url.path.lstrip("/") or 0),
        "password": url.password,
    }
