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
    """Whether `header` signs `body`; compared in constant time so timing leaks nothing (as
    bytes: compare_digest refuses non-ASCII text, and an attacker chooses the header)."""
    return same_secret(sign(body, app_secret), header.strip().lower())


def same_secret(expected: str, received: str) -> bool:
    """Constant-time equality of a secret and what a request carried (any text at all)."""
    return hmac.compare_digest(expected.encode("utf-8", "replace"), received.encode("utf-8", "replace"))
