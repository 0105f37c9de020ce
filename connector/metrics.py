"""Prometheus metrics of one channel, served at `GET /webhooks/whatsapp/metrics` (api_token).

Each `WhatsAppInput` owns a `Metrics` with a registry of its own (not prometheus_client's global
one: tests make many channels in one process) and hands it to the parts that count: the client
(Graph requests, errors, retries), the outbound path (decisions, suppressions, pricing), the
intake (turn retries) and the webhook handler (acks, inbound types, redeliveries).

Label values are bounded: message types, decisions, reason codes and pricing categories come
from fixed sets (anything else is `other`), Graph error codes are Meta's numbers. No label ever
carries a customer id or a phone number.
"""

from typing import Callable, Iterable, Optional, Union

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from connector.window import SuppressReason

INBOUND_TYPES = ("text", "interactive", "button", "image", "audio", "video", "document", "sticker", "location",
                 "contacts", "order", "edit", "call", "other")
"""WhatsApp message types that reach the inbox (a customer's call is `call`); any other is `other`."""
DECISIONS = ("free_form", "template", "suppressed", "failed", "unknown")
RETRY_KINDS = ("send", "turn")
PRICING_CATEGORIES = ("service", "utility", "marketing", "marketing_lite", "authentication",
                      "authentication_international", "referral_conversion", "other")
OPERATIONS = ("send", "mark_read", "templates", "media")

GRAPH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _bounded(value: Optional[str], known: Iterable[str]) -> str:
    return value if value in known else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._inbound = Counter(
            "whatsapp_inbound_messages", "Customer messages accepted into the inbox, by WhatsApp message type "
            "(a failed one Meta delivers again is accepted again)", ["type"], registry=r)
        self._outbound = Counter(
            "whatsapp_outbound_messages", "Outbound decisions as the send ended: free_form and template (Meta "
            "took it), suppressed, failed (Meta refused it), unknown (Meta never answered)", ["decision"], registry=r)
        self._suppressed = Counter(
            "whatsapp_suppressed", "Bot messages suppressed, by reason code", ["reason"], registry=r)
        self._graph_errors = Counter(
            "whatsapp_graph_errors", "Graph API errors by Meta's code, answered to a request or in a failed "
            "status (none: an HTTP error without a code; transport: no answer)", ["code"], registry=r)
        self._graph_seconds = Histogram(
            "whatsapp_graph_request_seconds", "Duration of each Cloud API request (every attempt)",
            ["operation"], buckets=GRAPH_BUCKETS, registry=r)
        self._ack_seconds = Histogram(
            "whatsapp_webhook_ack_seconds", "Time from a webhook request's arrival to its answer",
            buckets=ACK_BUCKETS, registry=r)
        self._retries = Counter(
            "whatsapp_retries", "Retries: send (a Cloud API request tried again), turn (a Rasa turn tried again)",
            ["kind"], registry=r)
        self._duplicates = Counter(
            "whatsapp_duplicates", "Webhook messages the inbox already had (done or being handled): redeliveries",
            registry=r)
        self._billable = Counter(
            "whatsapp_billable_messages", "Outbound messages Meta prices as billable, by pricing category "
            "(counted when a message's pricing is first stored)", ["category"], registry=r)
        for kind in INBOUND_TYPES:  # every fixed series exists from the start, so alerts see 0, not nothing
            self._inbound.labels(kind)
        for decision in DECISIONS:
            self._outbound.labels(decision)
        for code in SuppressReason:
            self._suppressed.labels(code.value)
        for kind in RETRY_KINDS:
            self._retries.labels(kind)

    def watch_loop(self, longest: Callable[[], float]) -> None:
        """The longest event-loop stall since start, read from the loop watchdog when scraped."""
        Gauge("whatsapp_event_loop_stall_seconds_max", "Longest the event loop was blocked since start "
              "(a blocking call, a full garbage collection, a CPU-bound stretch)", registry=self.registry
              ).set_function(longest)

    # --- counting ----------------------------------------------------------------------------

    def inbound(self, message_type: Optional[str]) -> None:
        self._inbound.labels(_bounded(message_type, INBOUND_TYPES)).inc()

    def duplicate(self) -> None:
        self._duplicates.inc()

    def decided(self, decision: str, reason_code: Optional[SuppressReason] = None) -> None:
        """One outbound decision; a suppression with its reason code."""
        self._outbound.labels(_bounded(decision, DECISIONS)).inc()
        if decision == "suppressed":
            known = {code.value for code in SuppressReason}
            code = reason_code.value if isinstance(reason_code, SuppressReason) else reason_code
            self._suppressed.labels(code if code in known else "other").inc()

    def graph_error(self, code: Union[int, None], answered: bool = True) -> None:
        """Meta's error code; `answered` False for a request that got no answer at all."""
        if isinstance(code, int) and not isinstance(code, bool):
            label = str(code)
        else:
            label = "none" if answered else "transport"
        self._graph_errors.labels(label).inc()

    def graph_request(self, operation: str, seconds: float) -> None:
        self._graph_seconds.labels(operation if operation in OPERATIONS else "other").observe(seconds)

    def webhook_acked(self, seconds: float) -> None:
        self._ack_seconds.observe(seconds)

    def retry(self, kind: str) -> None:
        self._retries.labels(kind if kind in RETRY_KINDS else "other").inc()

    def billable(self, category: Optional[str]) -> None:
        self._billable.labels(_bounded((category or "").lower() or None, PRICING_CATEGORIES)).inc()

    # --- serving -----------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
