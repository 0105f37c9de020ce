"""Meta's webhook signature: HMAC-SHA256 of the raw request body, keyed by the app secret.

The raw bytes are what is signed: re-serialised JSON differs (escaped unicode, key order), so
verification must run before the body is parsed.
"""

import hashlib
import hmac

PREFIX = "sha256="


def sign(body: bytes, app_secret: str) -> str:
    """The `X-Hub-Signature-256` header value Meta sends for `body`."""
    digest = hmac.new(app_secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return PREFIX + digest


def is_valid(body: bytes, header: str, app_secret: str) -> bool:
    """Whether `header` signs `body`; compared in constant time so timing leaks nothing."""
    return hmac.compare_digest(sign(body, app_secret), header.strip().lower())
