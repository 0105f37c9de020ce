"""Every outbound decision as one structured log line, so that nothing the bot meant to say
disappears without a trace (the care-window state keeps the records themselves). A suppression's
line carries its record's `reason_code` (a window.SuppressReason value), the label of
`whatsapp_suppressed_total`."""

import json
import logging
from typing import Optional

from connector.care_state import OutboundRecord

logger = logging.getLogger("connector.decisions")


def masked(wa_id: Optional[str]) -> str:
    """Enough of a customer's id to follow a conversation in the logs, not the phone number."""
    return f"...{wa_id[-4:]}" if wa_id else "?"


def outcome(record: OutboundRecord) -> str:
    """free_form, template, suppressed, or failed / unknown when Meta refused it or never answered."""
    return record.status if record.status in ("failed", "unknown") else record.decision


def log_decision(record: OutboundRecord) -> None:
    """The record's decision as one line; a suppression with its `reason_code`, read from the record."""
    kind = outcome(record)
    level = logging.INFO if kind in ("free_form", "template") else logging.WARNING
    if not logger.isEnabledFor(level):  # the line is not built for nobody: it was ~7 % of a send's CPU
        return
    reason_code = record.reason_code
    line = {
        "customer": masked(record.sender_id), "decision": kind, "response": record.response,
        "template": record.template, "wamid": record.wamid, "callback_id": record.callback_id,
        "code": record.error_code, "reason": record.reason,
        "reason_code": str(getattr(reason_code, "value", reason_code)) if reason_code else None,
        "window_of": record.window_of, "fallback_of": record.fallback_of,
    }
    logger.log(level, "whatsapp.outbound %s", json.dumps({k: v for k, v in line.items() if v is not None}))
