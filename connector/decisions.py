"""Every outbound decision as a structured log line, a counter and a short per-customer history,
so that nothing the bot meant to say disappears without a trace."""

import json
import logging
from collections import Counter, OrderedDict, deque
from typing import Any, Deque, Dict, List

logger = logging.getLogger("connector.decisions")


class DecisionLog:
    def __init__(self, per_customer: int = 20, customers: int = 10_000) -> None:
        self.counts: Counter = Counter()
        self._per_customer = per_customer
        self._customers = customers
        self._recent: "OrderedDict[str, Deque[Dict[str, Any]]]" = OrderedDict()

    def add(self, sender_id: str, record: Dict[str, Any]) -> None:
        self.counts[record["kind"]] += 1
        recent = self._recent.pop(sender_id, None) or deque(maxlen=self._per_customer)
        recent.append(record)
        self._recent[sender_id] = recent
        while len(self._recent) > self._customers:
            self._recent.popitem(last=False)
        level = logging.INFO if record["kind"] in ("free_form", "template") else logging.WARNING
        logger.log(level, "whatsapp.outbound %s", json.dumps({"customer": f"…{sender_id[-4:]}", **record}))

    def recent(self, sender_id: str) -> List[Dict[str, Any]]:
        return list(self._recent.get(sender_id, ()))
