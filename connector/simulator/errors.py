"""Graph API errors as Meta shapes them, so the connector's error handling is exercised for real.

One catalogue of codes feeds both places errors surface: the synchronous HTTP answer
(`{"error": {...}}`) and the asynchronous `errors[]` of a `failed` status webhook.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from typing import Any, Dict, Optional

ERROR_CODES_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"

# code -> (title, default details, HTTP status for the synchronous answer)
CATALOGUE: Dict[int, tuple] = {
    1: ("An unknown error occurred", "Invalid request or possible server error.", 400),
    2: ("Service temporarily unavailable", "Temporary due to downtime or due to being overloaded.", 503),
    4: ("Application request limit reached", "The app has reached its API call rate limit.", 400),
    100: ("Invalid parameter", "The request included one or more unsupported or misspelled parameters.", 400),
    190: ("Invalid OAuth access token - Cannot parse access token", "The access token is invalid or expired.", 401),
    80007: ("Rate limit issues", "The WhatsApp Business Account has reached its rate limit.", 400),
    130429: ("Rate limit hit", "Cloud API message throughput has been reached.", 429),
    131000: ("Something went wrong", "Message failed to send due to an unknown error.", 500),
    131008: ("Required parameter is missing", "The request is missing a required parameter.", 400),
    131009: ("Parameter value is not valid", "One or more parameter values are invalid.", 400),
    131016: ("Service unavailable", "A service is temporarily unavailable.", 503),
    131026: ("Message Undeliverable", "Unable to deliver message.", 400),
    131047: (
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
        400,
    ),
    131048: ("Spam rate limit hit", "Message failed to send because there are restrictions on how many messages can be sent from this phone number.", 400),
    131049: ("This message was not delivered to maintain healthy ecosystem engagement.", "Meta chose not to deliver this message.", 400),
    131050: ("Unable to deliver the message. This recipient has chosen to stop receiving marketing messages on WhatsApp from your business.", "The user stopped marketing messages.", 400),
    131051: ("Unsupported message type", "Message type is not currently supported.", 400),
    131056: ("(Business Account, Consumer Account) pair rate limit hit", "Too many messages sent from the sender phone number to the same recipient phone number in a short period of time.", 400),
    131057: ("Account in maintenance mode", "Business Account is in maintenance mode.", 503),
    132000: ("Number of parameters does not match the expected number of params", "The number of parameters does not match the template.", 400),
    132001: ("Template name does not exist in the translation", "Template name does not exist in the translation.", 400),
    132012: ("Parameter format does not match format in the created template", "Parameter format does not match the template.", 400),
    132015: ("Template is Paused", "Template is paused due to low quality so it cannot be sent in a template message.", 400),
    132016: ("Template is disabled", "Template has been paused too many times due to low quality and is now permanently disabled.", 400),
}


def new_fbtrace_id() -> str:
    """Meta's trace ids are short random alphanumerics; tests only need them present and distinct."""
    alphabet = string.ascii_letters + string.digits + "_-"
    return "".join(secrets.choice(alphabet) for _ in range(27))


@dataclass
class GraphError(Exception):
    """A rejection the send API answers synchronously; raised by validators, rendered by the server."""

    code: int
    details: Optional[str] = None
    http_status: Optional[int] = None
    error_type: str = "OAuthException"
    message: Optional[str] = None

    def __post_init__(self) -> None:
        title, default_details, status = CATALOGUE.get(self.code, ("Unknown error", "", 400))
        if self.details is None:
            self.details = default_details
        if self.http_status is None:
            self.http_status = status
        if self.message is None:
            self.message = f"(#{self.code}) {title}"
        super().__init__(self.message)

    def body(self) -> Dict[str, Any]:
        """The JSON Graph answers with: code, type, message, `error_data.details`, trace id."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "code": self.code,
                "error_data": {"messaging_product": "whatsapp", "details": self.details},
                "fbtrace_id": new_fbtrace_id(),
            }
        }


def webhook_error(code: int, details: Optional[str] = None) -> Dict[str, Any]:
    """One `errors[]` item as found in a failed status webhook (title == message, by Meta's design)."""
    title, default_details, _ = CATALOGUE.get(code, ("Unknown error", "", 400))
    return {
        "code": code,
        "title": title,
        "message": title,
        "error_data": {"details": details or default_details},
        "href": ERROR_CODES_HREF,
    }


def missing(param: str) -> GraphError:
    return GraphError(131008, f"The parameter {param} is required.")


def invalid(details: str) -> GraphError:
    return GraphError(131009, details)


def bad_request(details: str) -> GraphError:
    return GraphError(100, details)
