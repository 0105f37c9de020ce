"""The state in the tracker store's own Redis, under `whatsapp:` keys.

Every write that must be atomic is one Lua script, which Redis runs alone: a reservation checks
the window's set of template callback ids and adds to it in one step.

Handoffs: `h:<sender>` a hash per open handoff (since, reason, closing_sent_for), `hl` the open
ones' senders by `since`. Starting, ending and the window-closing mark are scripts, so exactly
one caller wins each.

The desk's events, kept until delivered (no expiry): `d:<event_id>` a hash per event (its body's
JSON untouched by Lua), `dq:<sender>` a customer's event ids by `seq` (from the counter `dn`),
and each customer with events in exactly one of two sets, by their head (lowest seq) event:
`dw` those whose head waits, scored by when it may be claimed (its next attempt, or the end of
its lease), and `dr` those whose head was found due, scored by its seq. A claim moves the `dw`
entries due by then into `dr`, then takes `dr` lowest seq first, checking each head's own
fields (a head that is not claimable after all goes back to `dw`), with the heads `do:<owner>`
(the events leased to that owner) holds, so an owner may claim its own again. Nothing scans
keys: a claim reads only what is due.

Templates as Meta knows them (no expiry): `t:` one hash, its field a template's `[name, language]`
as JSON, its value `{name, language, status, category, updated_at}` as JSON (`updated_at` kept as
the string written, so no precision is lost to cjson). A script compares `updated_at` before it
writes, so two instances writing at once keep the later word.

Marketing stops (no expiry: the customer's word stands until they change it): `m:<sender>` a
hash (stopped `1`/`0`, at), `at` kept as the string written; a script compares it before it writes,
so the later word wins. Pricing: `p:<callback_id>` a hash per outbound message (category,
billable, pricing_type, each as JSON so that null stays null), overwritten by each status that
carries one, expiring with the outbound records (`TTL_SECONDS`).
"""

import json
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

from connector.care_state.base import CareStateBackend
from connector.care_state.records import (
    STATUS_RANK, CustomerState, DeskEvent, Handoff, OutboundRecord, PendingTurn, Pricing, TemplateState,
    dump_json,
)

TTL_SECONDS = 35 * 24 * 3600  # records and reservations outlive Meta's redelivery and any window
_KEPT_PER_CUSTOMER = 200
INBOX_TTL_SECONDS = 8 * 24 * 3600  # a done turn is remembered longer than Meta redelivers (7 days)

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

# The inbox: `i:<key>` a hash per turn (its JSON untouched by Lua), `ip` the pending keys by lease
# end, `io:<owner>` the keys an owner holds, `iq:<sender>` a customer's keys by arrival.
_ACCEPT = """
local accepted = {}
for i = 4, #ARGV, 4 do
  local n = (i - 4) / 4 * 3
  local entry, queue, customer = KEYS[n + 3], KEYS[n + 4], KEYS[n + 5]
  local state = redis.call('HGET', entry, 'state')
  if (not state) or state == 'failed' then
    redis.call('HSET', entry, 'turn', ARGV[i + 1], 'sender_id', ARGV[i + 3], 'state', 'pending',
               'owner', ARGV[1], 'lease_until', ARGV[2], 'attempts', 0, 'error', '', 'finished_at', '')
    redis.call('EXPIRE', entry, ARGV[3])
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
    redis.call('SADD', KEYS[2], ARGV[i])
    redis.call('ZADD', queue, ARGV[i + 2], ARGV[i])
    redis.call('ZREMRANGEBYRANK', queue, 0, -201)
    redis.call('EXPIRE', queue, ARGV[3])
    local turn = cjson.decode(ARGV[i + 1])
    local current = redis.call('HGET', customer, 'last_inbound_at')
    if (not current) or tonumber(current) < turn['timestamp'] then
      redis.call('HSET', customer, 'last_inbound_at', turn['timestamp'], 'reply_number', turn['phone_number_id'])
    end
    table.insert(accepted, ARGV[i])
  end
end
return accepted
"""
_RENEW = """
for i = 4, #ARGV do
  local entry = ARGV[3] .. ARGV[i]
  if redis.call('HGET', entry, 'state') == 'pending' and redis.call('HGET', entry, 'owner') == ARGV[2] then
    redis.call('HSET', entry, 'lease_until', ARGV[1])
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  end
end
"""
_CLAIM = """
local prefix, owner, lease = ARGV[5], ARGV[1], ARGV[3]
local found = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
if ARGV[6] ~= '' then
  for _, key in ipairs(redis.call('SMEMBERS', prefix .. 'io:' .. ARGV[6])) do table.insert(found, key) end
end
local senders, claimed = {}, {}
for _, key in ipairs(found) do
  local sender = redis.call('HGET', prefix .. 'i:' .. key, 'sender_id')
  if sender and not senders[sender] then
    senders[sender] = true
    for _, mine in ipairs(redis.call('ZRANGE', prefix .. 'iq:' .. sender, 0, -1)) do
      local entry = prefix .. 'i:' .. mine
      if redis.call('HGET', entry, 'state') == 'pending' then
        local before = redis.call('HGET', entry, 'owner')
        if before then redis.call('SREM', prefix .. 'io:' .. before, mine) end
        redis.call('HSET', entry, 'owner', owner, 'lease_until', lease)
        redis.call('ZADD', KEYS[1], lease, mine)
        redis.call('SADD', KEYS[2], mine)
        table.insert(claimed, mine)
      end
    end
  end
  if #claimed >= tonumber(ARGV[4]) then break end
end
return claimed
"""
_FINISH = """
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('HSET', KEYS[1], 'attempts', ARGV[2], 'error', ARGV[3])
if ARGV[1] ~= 'pending' then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[4], 'owner', '')
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('ZREM', KEYS[2], ARGV[6])
  if owner then redis.call('SREM', ARGV[7] .. owner, ARGV[6]) end
end
"""

_START_HANDOFF = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'since', ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'reason', ARGV[4]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""
_END_HANDOFF = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
_MARK_CLOSING = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local marked = redis.call('HGET', KEYS[1], 'closing_sent_for')
if marked and tonumber(marked) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'closing_sent_for', ARGV[1])
return 1
"""

# Puts a customer in `dw` by their head's next attempt or lease end (the strings as written, so
# no precision is lost), or in neither set when they have no events left.
_PLACE = """
local function place(prefix, sender)
  redis.call('ZREM', prefix .. 'dr:', sender)
  local head = redis.call('ZRANGE', prefix .. 'dq:' .. sender, 0, 0)[1]
  if not head then
    redis.call('ZREM', prefix .. 'dw:', sender)
    return
  end
  local at = redis.call('HMGET', prefix .. 'd:' .. head, 'next_attempt_at', 'lease_until')
  local score = at[1] or '0'
  if at[2] and at[2] ~= '' and tonumber(at[2]) > tonumber(score) then score = at[2] end
  redis.call('ZADD', prefix .. 'dw:', score, sender)
end
"""
_ADD_DESK_EVENT = _PLACE + """
local prefix, id, sender = ARGV[1], ARGV[2], ARGV[3]
local entry, queue = prefix .. 'd:' .. id, prefix .. 'dq:' .. sender
if redis.call('EXISTS', entry) == 1 then return 1 end
if redis.call('ZCARD', queue) >= tonumber(ARGV[9]) then return 0 end
local seq = redis.call('INCR', prefix .. 'dn:')
redis.call('HSET', entry, 'event_id', id, 'sender_id', sender, 'body', ARGV[4], 'created_at', ARGV[5],
           'seq', seq, 'attempts', ARGV[6], 'next_attempt_at', ARGV[7], 'error', ARGV[8],
           'owner', '', 'lease_until', '')
redis.call('ZADD', queue, seq, id)
if redis.call('ZCARD', queue) == 1 then place(prefix, sender) end
return 1
"""
_CLAIM_DESK_EVENTS = _PLACE + """
local prefix, owner, now, lease, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ready, waiting, mine = prefix .. 'dr:', prefix .. 'dw:', prefix .. 'do:' .. owner
for _, sender in ipairs(redis.call('ZRANGEBYSCORE', waiting, '-inf', ARGV[3])) do
  local head = redis.call('ZRANGE', prefix .. 'dq:' .. sender, 0, 0, 'WITHSCORES')
  redis.call('ZREM', waiting, sender)
  if head[1] then redis.call('ZADD', ready, head[2], sender) end
end
local candidates, seen = {}, {}
local function consider(sender, id)
  if seen[id] then return true end
  local e = redis.call('HMGET', prefix .. 'd:' .. id, 'seq', 'next_attempt_at', 'owner', 'lease_until')
  if not e[1] or tonumber(e[2]) > now then return false end
  if e[3] ~= owner and e[4] ~= '' and tonumber(e[4]) >= now then return false end
  seen[id] = true
  table.insert(candidates, {tonumber(e[1]), id, sender, e[3]})
  return true
end
for _, id in ipairs(redis.call('SMEMBERS', mine)) do
  local e = redis.call('HMGET', prefix .. 'd:' .. id, 'sender_id', 'owner')
  if e[1] and e[2] == owner then consider(e[1], id) else redis.call('SREM', mine, id) end
end
local found, from = 0, '-inf'
while found < limit do
  local batch = redis.call('ZRANGEBYSCORE', ready, from, '+inf', 'WITHSCORES', 'LIMIT', 0, limit - found)
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    local sender = batch[i]
    from = '(' .. batch[i + 1]
    local head = redis.call('ZRANGE', prefix .. 'dq:' .. sender, 0, 0)[1]
    if head and consider(sender, head) then found = found + 1 else place(prefix, sender) end
  end
end
table.sort(candidates, function(a, b) return a[1] < b[1] end)
local claimed = {}
for i = 1, math.min(limit, #candidates) do
  local c = candidates[i]
  local entry = prefix .. 'd:' .. c[2]
  if c[4] ~= '' and c[4] ~= owner then redis.call('SREM', prefix .. 'do:' .. c[4], c[2]) end
  redis.call('HSET', entry, 'owner', owner, 'lease_until', lease)
  redis.call('SADD', mine, c[2])
  place(prefix, c[3])
  table.insert(claimed, redis.call('HGETALL', entry))
end
return claimed
"""
_DESK_EVENT_DONE = _PLACE + """
local prefix, id = ARGV[1], ARGV[2]
local entry = prefix .. 'd:' .. id
local e = redis.call('HMGET', entry, 'sender_id', 'owner')
if not e[1] then return 0 end
if e[2] and e[2] ~= '' then redis.call('SREM', prefix .. 'do:' .. e[2], id) end
if ARGV[3] == 'delivered' then
  redis.call('DEL', entry)
  redis.call('ZREM', prefix .. 'dq:' .. e[1], id)
else
  redis.call('HSET', entry, 'attempts', ARGV[4], 'error', ARGV[5], 'next_attempt_at', ARGV[6],
             'owner', '', 'lease_until', '')
end
place(prefix, e[1])
return 1
"""

# ARGV: field, name, language, status, category, updated_at, then '1' to write the status, '1' the category
_UPDATE_TEMPLATE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local t = {name = ARGV[2], language = ARGV[3], status = '', category = ''}
if raw then
  t = cjson.decode(raw)
  if tonumber(t['updated_at']) > tonumber(ARGV[6]) then return 0 end
end
if ARGV[7] == '1' then t['status'] = ARGV[4] end
if ARGV[8] == '1' then t['category'] = ARGV[5] end
t['updated_at'] = ARGV[6]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(t))
return 1
"""

# ARGV: stopped ('1' or '0'), at
_SET_MARKETING_STOPPED = """
local at = redis.call('HGET', KEYS[1], 'at')
if at and tonumber(at) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'stopped', ARGV[1], 'at', ARGV[2])
return 1
"""
_PRICING_FIELDS = ("category", "billable", "pricing_type")


class RedisBackend(CareStateBackend):
    def __init__(self, red: Any, prefix: str = "whatsapp:") -> None:
        self.red = red
        self.prefix = prefix
        self._raise_field = red.register_script(_RAISE_FIELD)
        self._reserve = red.register_script(_RESERVE)
        self._update = red.register_script(_UPDATE)
        self._accept = red.register_script(_ACCEPT)
        self._renew = red.register_script(_RENEW)
        self._claim = red.register_script(_CLAIM)
        self._finish = red.register_script(_FINISH)
        self._start_handoff = red.register_script(_START_HANDOFF)
        self._end_handoff = red.register_script(_END_HANDOFF)
        self._mark_closing = red.register_script(_MARK_CLOSING)
        self._add_desk_event = red.register_script(_ADD_DESK_EVENT)
        self._claim_desk_events = red.register_script(_CLAIM_DESK_EVENTS)
        self._desk_event_done = red.register_script(_DESK_EVENT_DONE)
        self._update_template = red.register_script(_UPDATE_TEMPLATE)
        self._set_marketing_stopped = red.register_script(_SET_MARKETING_STOPPED)

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

    # --- the inbox ---------------------------------------------------------------------------

    def accept_turns(self, turns: Sequence[PendingTurn], owner: str, lease_until: float) -> List[str]:
        keys, args = [self._key("ip", ""), self._key("io", owner)], [owner, lease_until, INBOX_TTL_SECONDS]
        for turn in {turn.key: turn for turn in turns}.values():
            keys += [self._key("i", turn.key), self._key("iq", turn.sender_id), self._key("c", turn.sender_id)]
            args += [turn.key, _dump_turn(turn), turn.received_at, turn.sender_id]
        return [_text(key) for key in self._accept(keys=keys, args=args)]

    def renew_leases(self, keys: Sequence[str], owner: str, lease_until: float) -> None:
        if keys:
            self._renew(keys=[self._key("ip", "")], args=[lease_until, owner, self._key("i", ""), *keys])

    def claim_turns(self, owner, now, lease_until, limit, take_over=None):
        claimed = self._claim(keys=[self._key("ip", ""), self._key("io", owner)],
                              args=[owner, now, lease_until, limit, self.prefix, take_over or ""])
        return [turn for turn in (self._turn(_text(key)) for key in claimed) if turn is not None]

    def _turn(self, key: str) -> Optional[PendingTurn]:
        fields = {_text(k): _text(v) for k, v in self.red.hgetall(self._key("i", key)).items()}
        if not fields.get("turn"):
            return None
        data = json.loads(fields["turn"])
        return PendingTurn(**{**data, "state": fields.get("state") or "pending",
                              "attempts": int(fields.get("attempts") or 0), "error": fields.get("error") or None})

    def turn_failed(self, key: str, attempts: int, error: str, final: bool) -> None:
        self._finish(keys=[self._key("i", key), self._key("ip", "")],
                     args=["failed" if final else "pending", attempts, error, time.time(), 35 * 24 * 3600, key,
                           self._key("io", "")])

    def turn_done(self, key: str) -> None:
        self._finish(keys=[self._key("i", key), self._key("ip", "")],
                     args=["done", 0, "", time.time(), INBOX_TTL_SECONDS, key, self._key("io", "")])

    def turns_of(self, sender_id: str, limit: int) -> List[PendingTurn]:
        keys = self.red.zrevrange(self._key("iq", sender_id), 0, limit - 1)
        return [turn for turn in (self._turn(_text(key)) for key in keys) if turn is not None]

    def forget_turns(self, finished_before: float) -> int:
        return 0  # finished entries expire on their own

    # --- handoffs and the desk's events ------------------------------------------------------

    def start_handoff(self, sender_id: str, since: float, reason: Optional[str]) -> bool:
        return bool(self._start_handoff(keys=[self._key("h", sender_id), self._key("hl", "")],
                                        args=[sender_id, since, "0" if reason is None else "1", reason or ""]))

    def end_handoff(self, sender_id: str) -> bool:
        return bool(self._end_handoff(keys=[self._key("h", sender_id), self._key("hl", "")], args=[sender_id]))

    def handoffs(self, limit: int) -> List[Handoff]:
        if limit <= 0:
            return []
        return self._handoffs([_text(s) for s in self.red.zrange(self._key("hl", ""), 0, limit - 1)])

    def handoff(self, sender_id: str) -> Optional[Handoff]:
        return next(iter(self._handoffs([sender_id])), None)

    def _handoffs(self, senders: Sequence[str]) -> List[Handoff]:
        pipe = self.red.pipeline(transaction=True)  # one snapshot of the handoffs and their windows
        for sender_id in senders:
            pipe.hgetall(self._key("h", sender_id))
            pipe.hget(self._key("c", sender_id), "last_inbound_at")
        replies = pipe.execute() if senders else []
        found = []
        for sender_id, raw, last_inbound_at in zip(senders, replies[::2], replies[1::2]):
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if fields.get("since"):  # ended since it was listed
                closing = fields.get("closing_sent_for")
                found.append(Handoff(sender_id, float(fields["since"]), fields.get("reason"),
                                     int(closing) if closing else None,
                                     int(_text(last_inbound_at)) if last_inbound_at else None))
        return found

    def mark_window_closing(self, sender_id: str, window_of: int) -> bool:
        return bool(self._mark_closing(keys=[self._key("h", sender_id)], args=[window_of]))

    def add_desk_event(self, event: DeskEvent, limit: int) -> bool:
        return bool(self._add_desk_event(args=[
            self.prefix, event.event_id, event.sender_id, dump_json(dict(event.body)), event.created_at,
            event.attempts, event.next_attempt_at, event.error or "", limit]))

    def claim_desk_events(self, owner: str, now: float, lease_until: float, limit: int) -> List[DeskEvent]:
        claimed = self._claim_desk_events(args=[self.prefix, owner, now, lease_until, limit])
        return [_desk_event(dict(zip(map(_text, flat[::2]), map(_text, flat[1::2])))) for flat in claimed]

    def desk_event_delivered(self, event_id: str) -> None:
        self._desk_event_done(args=[self.prefix, event_id, "delivered"])

    def desk_event_failed(self, event_id: str, attempts: int, error: str, next_attempt_at: float) -> None:
        self._desk_event_done(args=[self.prefix, event_id, "failed", attempts, error, next_attempt_at])

    def desk_backlog(self, sender_id: str, limit: int) -> List[DeskEvent]:
        if limit <= 0:
            return []
        ids = self.red.zrange(self._key("dq", sender_id), 0, limit - 1)
        pipe = self.red.pipeline(transaction=False)
        for event_id in ids:
            pipe.hgetall(self._key("d", _text(event_id)))
        events = ({_text(k): _text(v) for k, v in raw.items()} for raw in (pipe.execute() if ids else []))
        return [_desk_event(fields) for fields in events if fields.get("event_id")]

    # --- templates as Meta knows them ---------------------------------------------------------

    def update_template(self, template: TemplateState, status: bool = True, category: bool = True) -> bool:
        return bool(self._update_template(keys=[self._key("t", "")], args=[
            dump_json([template.name, template.language]), template.name, template.language, template.status,
            template.category, repr(float(template.updated_at)), "1" if status else "0", "1" if category else "0"]))

    def templates(self) -> List[TemplateState]:
        found = []
        for raw in self.red.hgetall(self._key("t", "")).values():
            data = json.loads(_text(raw))
            found.append(TemplateState(name=data["name"], language=data["language"], status=data.get("status") or "",
                                       category=data.get("category") or "", updated_at=float(data["updated_at"])))
        return sorted(found, key=lambda t: (t.name, t.language))

    # --- marketing stops and pricing ------------------------------------------------------------

    def set_marketing_stopped(self, sender_id: str, stopped: bool, at: float) -> bool:
        return bool(self._set_marketing_stopped(keys=[self._key("m", sender_id)],
                                                args=["1" if stopped else "0", repr(float(at))]))

    def marketing_stopped(self, sender_id: str) -> bool:
        return _text(self.red.hget(self._key("m", sender_id), "stopped")) == "1"

    def set_pricing(self, callback_id: str, pricing: Pricing) -> None:
        key = self._key("p", callback_id)
        pipe = self.red.pipeline(transaction=True)
        pipe.hset(key, mapping={name: json.dumps(getattr(pricing, name)) for name in _PRICING_FIELDS})
        pipe.expire(key, TTL_SECONDS)
        pipe.execute()

    def pricing_of(self, callback_ids: Sequence[str]) -> Dict[str, Pricing]:
        ids = list(dict.fromkeys(callback_ids))
        pipe = self.red.pipeline(transaction=False)
        for callback_id in ids:
            pipe.hmget(self._key("p", callback_id), *_PRICING_FIELDS)
        found: Dict[str, Pricing] = {}
        for callback_id, values in zip(ids, pipe.execute() if ids else []):
            if any(value is not None for value in values):
                found[callback_id] = Pricing(*(None if value is None else json.loads(_text(value)) for value in values))
        return found


def _desk_event(fields: dict) -> DeskEvent:
    return DeskEvent(
        event_id=fields["event_id"], sender_id=fields["sender_id"], body=json.loads(fields["body"]),
        created_at=float(fields["created_at"]), seq=int(fields["seq"]), attempts=int(fields.get("attempts") or 0),
        next_attempt_at=float(fields.get("next_attempt_at") or 0), error=fields.get("error") or None,
    )


def _dump_turn(turn: PendingTurn) -> str:
    data = asdict(turn)
    for name in ("state", "attempts", "error"):  # kept as fields of their own
        data.pop(name)
    return dump_json(data)


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
