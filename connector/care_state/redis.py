"""The state in the tracker store's own Redis, under `whatsapp:` keys.

Every write that must be atomic is one Lua script, which Redis runs alone: a reservation checks
the window's set of template callback ids and adds to it in one step.
"""

import json
from dataclasses import asdict
from typing import Any, List, Optional

from connector.care_state.base import CareStateBackend
from connector.care_state.records import STATUS_RANK, CustomerState, OutboundRecord

TTL_SECONDS = 35 * 24 * 3600  # records and reservations outlive Meta's redelivery and any window
_KEPT_PER_CUSTOMER = 200

_RAISE_FIELD = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (not current) or tonumber(current) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  if ARGV[3] then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
end
"""
_RESERVE = """
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return 1
"""
_UPDATE = """
local key = nil
if ARGV[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 1 then key = KEYS[1]
elseif ARGV[2] ~= '' then
  local callback = redis.call('GET', KEYS[2])
  if callback then key = ARGV[6] .. callback end
end
if not key then return false end
local record = cjson.decode(redis.call('GET', key))
local rank = tonumber(ARGV[4])
if record['status_rank'] >= rank then return false end
record['status'] = ARGV[3]
record['status_rank'] = rank
if ARGV[2] ~= '' and record['wamid'] == cjson.null then
  record['wamid'] = ARGV[2]
  redis.call('SET', KEYS[2], record['callback_id'], 'EX', ARGV[7])
end
local extra = cjson.decode(ARGV[5])
for name, value in pairs(extra) do record[name] = value end
local encoded = cjson.encode(record)
redis.call('SET', key, encoded, 'KEEPTTL')
return encoded
"""


class RedisBackend(CareStateBackend):
    def __init__(self, red: Any, prefix: str = "whatsapp:") -> None:
        self.red = red
        self.prefix = prefix
        self._raise_field = red.register_script(_RAISE_FIELD)
        self._reserve = red.register_script(_RESERVE)
        self._update = red.register_script(_UPDATE)

    def _key(self, kind: str, *parts: Any) -> str:
        return self.prefix + kind + ":" + ":".join(str(part) for part in parts)

    def create_schema(self) -> None:
        self.red.ping()  # nothing to create; a Redis that cannot be reached fails startup

    def customer(self, sender_id: str) -> CustomerState:
        fields = {_text(k): _text(v) for k, v in self.red.hgetall(self._key("c", sender_id)).items()}
        number = lambda name: int(fields[name]) if fields.get(name) else None  # noqa: E731
        return CustomerState(sender_id, number("last_inbound_at"), fields.get("reply_number") or None,
                             number("closed_for_inbound"), fields.get("opt_out_pending") == "1")

    def note_inbound(self, sender_id: str, timestamp: int, phone_number_id: Optional[str]) -> None:
        self._raise_field(keys=[self._key("c", sender_id)],
                          args=["last_inbound_at", timestamp, "reply_number", phone_number_id or ""])

    def close_window(self, sender_id: str, inbound_at: int) -> None:
        self._raise_field(keys=[self._key("c", sender_id)], args=["closed_for_inbound", inbound_at])

    def set_opt_out_pending(self, sender_id: str, pending: bool) -> None:
        self.red.hset(self._key("c", sender_id), "opt_out_pending", "1" if pending else "0")

    def templates_reserved(self, sender_id: str, window_of: int) -> int:
        return int(self.red.scard(self._key("r", sender_id, window_of)))

    def reserve_template(self, record: OutboundRecord, limit: int) -> bool:
        keys = [self._key("r", record.sender_id, record.window_of), self._key("o", record.callback_id),
                self._key("s", record.sender_id)]
        taken = self._reserve(keys=keys, args=[limit, record.callback_id, _dump(record), record.created_at, TTL_SECONDS])
        if taken:
            self._trim(record.sender_id)
        return bool(taken)

    def release_template(self, record: OutboundRecord) -> None:
        self.red.srem(self._key("r", record.sender_id, record.window_of), record.callback_id)

    def add_outbound(self, record: OutboundRecord) -> None:
        pipe = self.red.pipeline(transaction=True)
        pipe.set(self._key("o", record.callback_id), _dump(record), ex=TTL_SECONDS)
        if record.wamid:
            pipe.set(self._key("w", record.wamid), record.callback_id, ex=TTL_SECONDS)
        pipe.zadd(self._key("s", record.sender_id), {record.callback_id: record.created_at})
        pipe.execute()
        self._trim(record.sender_id)

    def _trim(self, sender_id: str) -> None:
        self.red.zremrangebyrank(self._key("s", sender_id), 0, -_KEPT_PER_CUSTOMER - 1)

    def update_outbound(self, status, callback_id=None, wamid=None, error_code=None, reason=None):
        if callback_id is None and wamid is None:
            return None
        extra = {k: v for k, v in (("error_code", error_code), ("reason", reason)) if v is not None}
        encoded = self._update(
            keys=[self._key("o", callback_id or ""), self._key("w", wamid or "")],
            args=[callback_id or "", wamid or "", status, STATUS_RANK[status], json.dumps(extra),
                  self._key("o", ""), TTL_SECONDS],
        )
        return _load(encoded) if encoded else None

    def outbound(self, callback_id: str) -> Optional[OutboundRecord]:
        raw = self.red.get(self._key("o", callback_id))
        return _load(raw) if raw else None

    def recent_outbound(self, sender_id: str, limit: int) -> List[OutboundRecord]:
        callbacks = self.red.zrevrange(self._key("s", sender_id), 0, limit - 1)
        raws = self.red.mget([self._key("o", _text(c)) for c in callbacks]) if callbacks else []
        return [_load(raw) for raw in raws if raw]


def _text(value: Any) -> str:
    """Rasa's client decodes responses; a client of one's own may not."""
    return value.decode() if isinstance(value, bytes) else value


def _dump(record: OutboundRecord) -> str:
    data = asdict(record)
    data["status_rank"] = record.status_rank
    return json.dumps(data, default=str)


def _load(raw: Any) -> OutboundRecord:
    data = json.loads(raw)
    data.pop("status_rank", None)
    data["choices"] = tuple(tuple(choice) for choice in data.get("choices") or ())
    if not isinstance(data.get("rendered_with"), dict):  # cjson may encode an empty table as []
        data["rendered_with"] = {}
    return OutboundRecord(**data)
