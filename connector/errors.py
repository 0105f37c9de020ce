"""Graph API errors as typed exceptions, chosen by Meta's numeric `code` (never by the title).

The same codes arrive synchronously in a send response and later inside a `failed` status, so
both paths map through `GraphError.from_error_object`.
"""

from typing import Any, Dict, Mapping, Optional, Type


class GraphError(Exception):
    """An error answered by the Cloud API (or a transport failure dressed as one)."""

    retryable = False

    def __init__(
        self,
        code: Optional[int],
        message: str,
        http_status: Optional[int] = None,
        details: Optional[str] = None,
        fbtrace_id: Optional[str] = None,
    ) -> None:
        super().__init__(f"Graph error {code}: {message}" + (f" ({details})" if details else ""))
        self.code = code
        self.message = message
        self.http_status = http_status
        self.details = details
        self.fbtrace_id = fbtrace_id

    @classmethod
    def from_error_object(cls, error: Mapping[str, Any], http_status: Optional[int] = None) -> "GraphError":
        """Build the typed error for Graph's `error` object (or a status's `errors[]` item)."""
        code = error.get("code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        error_data = error.get("error_data")
        details = error_data.get("details") if isinstance(error_data, Mapping) else None
        error_class = _BY_CODE.get(code) if code is not None else None
        if error_class is None:
            error_class = TransientError if http_status is not None and http_status >= 500 else GraphError
        return error_class(
            code=code,
            message=str(error.get("message") or error.get("title") or "unknown error"),
            http_status=http_status,
            details=str(details) if details else None,
            fbtrace_id=error.get("fbtrace_id"),
        )

    @classmethod
    def from_response(cls, http_status: int, body: Any) -> "GraphError":
        error = body.get("error") if isinstance(body, Mapping) else None
        if isinstance(error, Mapping):
            return cls.from_error_object(error, http_status)
        text = str(body)[:200] if body else "no body"
        fallback = TransientError if http_status >= 500 else GraphError
        return fallback(code=None, message=f"HTTP {http_status}: {text}", http_status=http_status)


class AuthError(GraphError):
    """190: the access token is invalid or expired."""


class ReEngagementRequired(GraphError):
    """131047: the customer last wrote more than 24 h ago; only a template may go out."""


class Undeliverable(GraphError):
    """131026: no WhatsApp account, an old app, or unaccepted terms; retrying cannot help."""


class TemplateError(GraphError):
    """132xxx: the template or its parameters do not match what Meta approved."""


class TemplateUnavailable(TemplateError):
    """132015 (paused for low quality), 132016 (disabled): Meta stopped the template itself."""

    status = "PAUSED"


class TemplateDisabled(TemplateUnavailable):
    status = "DISABLED"


class OutcomeUnknown(GraphError):
    """The request went out and no answer came back (timeout, dropped connection): Meta may have
    taken the message. Never retried blindly; a status webhook carrying its callback id tells."""


class MarketingNotDelivered(GraphError):
    """131049 (per-user marketing limit), 131050 (the customer stopped marketing messages)."""


class MarketingStopped(MarketingNotDelivered):
    """131050: the customer stopped marketing messages; utility templates still reach them."""


class TransientError(GraphError):
    """Meta or the network failed for now: 131000, 131016, 1, 2, HTTP 5xx, timeouts."""

    retryable = True


class RateLimited(TransientError):
    """130429 (throughput), 131056 (same customer too fast), 131057 (maintenance / upgrade)."""


class AccountRateLimited(GraphError):
    """4 (app call limit), 80007 (account limit): counted over an hour, so retrying within a
    turn only burns more calls; not retried."""


_BY_CODE: Dict[int, Type[GraphError]] = {
    190: AuthError,
    131047: ReEngagementRequired,
    131026: Undeliverable,
    131049: MarketingNotDelivered,
    131050: MarketingStopped,
    130429: RateLimited,
    131056: RateLimited,
    131057: RateLimited,
    4: AccountRateLimited,
    80007: AccountRateLimited,
    131000: TransientError,
    131016: TransientError,
    1: TransientError,
    2: TransientError,
    132000: TemplateError,
    132001: TemplateError,
    132005: TemplateError,
    132007: TemplateError,
    132012: TemplateError,
    132015: TemplateUnavailable,
    132016: TemplateDisabled,
}


MEANINGS: Dict[int, str] = {
    131047: "more than 24 hours since the customer last wrote (only a template may go out)",
    131026: "undeliverable: no WhatsApp account, an old app, or terms not accepted",
    131049: "Meta's per-user marketing limit: not delivered now, not retried",
    131050: "the customer stopped marketing messages",
    131051: "unsupported message type",
    131048: "spam rate limit for this number",
    132000: "template parameters do not match what Meta approved",
    132001: "template does not exist in that language",
    132005: "template text too long once filled",
    132007: "template breaks a format policy",
    132012: "template parameter in the wrong format",
    132015: "template paused for low quality",
    132016: "template disabled",
}


def meaning(code: Optional[int]) -> Optional[str]:
    return MEANINGS.get(code) if code is not None else None
