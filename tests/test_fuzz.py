"""Fuzz the REAL webhook blueprint with random, mutated and generated bodies (hypothesis).

Every example builds a fresh Sanic app exactly like `tests/test_channel.py` (Rasa's own
`register`, a recording agent on `app.ctx.agent`), posts one body, drains the channel's turns and
checks:

- the status is never 5xx, and is the one the signature/JSON rules call for;
- no background job, task or loop callback failed: a task factory keeps every task the example
  created, a loop exception handler catches "Task exception was never retrieved", and a log
  handler fails the example on any ERROR record or logged traceback (the recording agent never
  raises, so any of those is a connector bug);
- whatever reached the agent is something Rasa can store (non-empty text, ids, JSON metadata, a
  finite WhatsApp timestamp);
- for generated batches: every valid message is delivered exactly once, in order per customer,
  with the right sender_id, message_id, text and timestamp, whatever broken items surround it.

Strategies: (1) random JSON / random bytes / webhook skeletons with random innards / deep
nesting, with a share of unsigned and badly signed posts; (2) every fixture in
`tests/fixtures/webhooks/` mutated (keys deleted, values swapped for other JSON types, huge
strings and numbers, lists duplicated, nodes wrapped and transplanted); (3) valid-message batches
across entries and changes, mixed with broken messages, statuses and broken containers.

The `@example`s are minimal inputs of bugs this file found (a 500, a failed background job, a
whole batch refused for one odd item); they run every time, whatever the seed. Examples per test:
WHATSAPP_FUZZ_EXAMPLES (400 by default, about 45 s for the file on 2 cores).
"""

import asyncio
import copy
import json
import logging
import math
import os
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from hypothesis import HealthCheck, Phase, event, example, given, settings, strategies as st
from sanic import Sanic

from rasa.core.channels.channel import register
from rasa.core.lock_store import InMemoryLockStore
from rasa.core.tracker_store import InMemoryTrackerStore
from rasa.shared.core.domain import Domain

from connector.channel import WhatsAppInput
from connector.signature import sign
from tests.fixtures.loader import WEBHOOKS, webhook

SECRET = "fuzz-app-secret"
PHONE_NUMBER_ID = "106540352242922"
DISPLAY_NUMBER = "15550783881"
CREDENTIALS = {
    "access_token": "fuzz-token",
    "phone_number_id": PHONE_NUMBER_ID,
    "app_secret": SECRET,
    "verify_token": "fuzz-verify",
    "api_url": "http://127.0.0.1:9",  # unreachable: inbound handling must not need it
    "api_version": "v23.0",
}
URL = "/webhooks/whatsapp/webhook"
WABA = "whatsapp_business_account"
OPT_OUT_KEYWORDS = ("STOP", "UNSUBSCRIBE")  # the channel's defaults (config.py)
OPT_OUT_TEXT = "/opt_out"
MEDIA_INTENT = "/whatsapp_media"  # the channel's default inbound_intents (README)
LOCATION_INTENT = "/whatsapp_location"
ALLOWED = {200, 400, 401, 403, 413}
MAX_BODY_BYTES = 1_048_576  # the channel's default max_body_bytes
FIXTURES = sorted(path.stem for path in WEBHOOKS.glob("*.json"))
with warnings.catch_warnings():  # Rasa warns about slot auto-fill for any domain with slots
    warnings.simplefilter("ignore")
    DOMAIN = Domain.from_dict({
        "slots": {"whatsapp_opt_in": {"type": "bool", "influence_conversation": False, "mappings": [{"type": "custom"}]}},
    })

# Examples per test: ~400 keeps the file near 45 s on 2 cores; raise it for a long bug hunt,
# e.g. WHATSAPP_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py --hypothesis-seed=7
EXAMPLES = int(os.environ.get("WHATSAPP_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # "explain" reruns every failure ~500 times
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


# --- the harness ----------------------------------------------------------------------------


class RecordingAgent:
    """Stands in for Rasa's Agent: records what `handle_message` gets, never raises, and has the
    stores the channel uses outside a turn (opt-out, Meta's 131047)."""

    def __init__(self) -> None:
        self.messages: List[Any] = []
        self.tracker_store = InMemoryTrackerStore(DOMAIN)
        self.lock_store = InMemoryLockStore()

    async def handle_message(self, message: Any) -> None:
        self.messages.append(message)


class _Problems(logging.Handler):
    """Any ERROR record or logged traceback, from any logger, during one example."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            text = f"{record.name} {record.levelname}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
            self.found.append(text[:2000])


@dataclass
class Outcome:
    status: int
    text: str
    delivered: List[Any]
    problems: List[str] = field(default_factory=list)


def exchange(body: bytes, header: Optional[bytes]) -> Outcome:
    """POST `body` (with `header` as X-Hub-Signature-256, None for no header) to a fresh app on a
    fresh event loop; drain the channel; collect every failure the example caused."""
    return asyncio.run(_exchange(body, header))


async def _exchange(body: bytes, header: Optional[bytes]) -> Outcome:
    loop = asyncio.get_running_loop()
    problems: List[str] = []
    loop.set_exception_handler(
        lambda _, context: problems.append(f"loop: {context.get('message')} {context.get('exception')!r}")
    )
    tasks: List["asyncio.Task[Any]"] = []

    def keep(loop: asyncio.AbstractEventLoop, coro: Any) -> "asyncio.Task[Any]":
        task = asyncio.Task(coro, loop=loop)
        tasks.append(task)
        return task

    loop.set_task_factory(keep)
    handler = _Problems()
    root = logging.getLogger()
    Sanic.test_mode = True
    app = Sanic(f"whatsapp_fuzz_{uuid.uuid4().hex}")
    root.addHandler(handler)
    try:
        app.ctx.agent = RecordingAgent()
        channel = WhatsAppInput.from_credentials(CREDENTIALS)
        register([channel], app, route="/webhooks/")
        headers = {b"content-type": b"application/json"}
        if header is not None:
            headers[b"x-hub-signature-256"] = header
        _, response = await app.asgi_client.post(URL, content=body, headers=headers)
        await channel.turns.drain()
        await asyncio.sleep(0)
        for task in tasks:
            if not task.done():
                problems.append(f"task still pending after drain: {task!r}"[:500])
            elif not task.cancelled() and task.exception() is not None:
                problems.append(f"task failed: {task.exception()!r}"[:500])
        await channel.client.close()
        return Outcome(response.status, response.text[:300], list(app.ctx.agent.messages), problems + handler.found)
    finally:
        root.removeHandler(handler)
        Sanic._app_registry.pop(app.name, None)


def check_common(outcome: Outcome, allowed: set, body: bytes) -> None:
    if len(body) > MAX_BODY_BYTES:
        allowed = {413}
    event(f"status {outcome.status}")  # --hypothesis-show-statistics: how deep the examples got
    event("delivered " + ("none" if not outcome.delivered else "1" if len(outcome.delivered) == 1 else "several"))
    assert not outcome.problems, "\n".join(outcome.problems)
    assert outcome.status in ALLOWED, (outcome.status, outcome.text)
    assert outcome.status in allowed, (outcome.status, outcome.text)
    if outcome.status != 200:
        assert outcome.delivered == [], "a refused webhook reached Rasa"
    for message in outcome.delivered:
        # What real Rasa needs to run and store the turn.
        assert isinstance(message.text, str) and message.text == message.text.strip() and message.text
        assert isinstance(message.sender_id, str) and message.sender_id
        assert isinstance(message.message_id, str) and message.message_id
        assert message.input_channel == "whatsapp"
        json.dumps(message.metadata)
        timestamp = message.metadata["whatsapp"]["timestamp"]
        assert isinstance(timestamp, int) and 0 < timestamp < 10**308, "the care window reads it as a float"


def expected_for_signed(body: bytes) -> set:
    """What a correctly signed body may be answered with."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return {400}
    if not isinstance(parsed, dict):
        return {400}
    return {200, 400}


def signed(body: bytes, style: str = "exact") -> bytes:
    header = sign(body, SECRET)
    if style == "upper":
        header = header.upper()
    elif style == "padded":
        header = f"  {header} "
    return header.encode("ascii")


# --- building blocks ------------------------------------------------------------------------

VOCAB_KEYS = [
    "object", "entry", "id", "time", "changes", "field", "value", "messaging_product", "metadata",
    "phone_number_id", "display_phone_number", "contacts", "profile", "name", "username", "wa_id",
    "user_id", "parent_user_id", "messages", "from", "from_user_id", "timestamp", "type", "text",
    "body", "context", "forwarded", "referred_product", "image", "audio", "video", "document",
    "sticker", "caption", "mime_type", "sha256", "filename", "voice", "animated", "location",
    "latitude", "longitude", "address", "url", "interactive", "button_reply", "list_reply",
    "nfm_reply", "response_json", "title", "description", "button", "payload", "reaction",
    "emoji", "message_id", "order", "catalog_id", "product_items", "quantity", "item_price",
    "currency", "edit", "original_message_id", "message", "revoke", "system", "new_wa_id",
    "referral", "welcome_message", "errors", "code", "error_data", "details", "statuses",
    "status", "recipient_id", "recipient_user_id", "pricing", "billable", "category",
    "calls", "event", "direction", "to", "duration", "user_preferences", "detail",
]
VOCAB_VALUES = [
    WABA, "messages", "calls", "user_preferences", "account_update", "whatsapp", "text", "image",
    "audio", "video", "document", "sticker", "location", "contacts", "interactive", "button",
    "button_reply", "list_reply", "nfm_reply", "reaction", "order", "edit", "revoke", "system",
    "unsupported", "user_changed_number", "failed", "read", "sent", "delivered", "connect",
    "terminate", "BUSINESS_INITIATED", "USER_INITIATED", "marketing_messages", "stop", "resume",
    PHONE_NUMBER_ID, DISPLAY_NUMBER, "16315551181", "US.13491208655302741918", "1732543200",
    "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM", "STOP", "/order_status", "hi", "", " ",
]
SPECIAL_SCALARS = [
    None, True, False, 0, -1, 1, 131047, 131026, 1732543200, -1732543200, 2**31, 2**53 + 1, 2**63,
    -(2**63), 2**64, 10**20, 10**308, 10**309, 10**400, -(10**400), 0.5, -0.0, 1e-300, 1e308,
    -1e308, 1732543200.0, float("inf"), float("-inf"), float("nan"),
    "", " ", "\t\n", "\u00a0", "\u200b", "\x00", "\x1f", "\ud800", "0", "-1", "-1732543200",
    " 1732543200 ", "1732543200.0", "1e10", "1_732_543_200", "\u0661\u0667\u0663\u0662", "NaN",
    "inf", "9" * 308, "9" * 309, "9" * 400, "STOP", " unsubscribe ", "/opt_out", "/", "/ ",
    "\U0001F600", "\u202e\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "null", "{}", "[]", "true",
    "x" * 5000,
]


def _text_strategy(max_size: int = 60) -> st.SearchStrategy[str]:
    """Unicode including control characters, whitespace and lone surrogates."""
    return st.text(st.characters(codec=None, exclude_categories=()), max_size=max_size)


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    _text_strategy(), st.sampled_from(VOCAB_VALUES), st.sampled_from(SPECIAL_SCALARS),
)
json_keys = st.one_of(st.sampled_from(VOCAB_KEYS), _text_strategy(12))
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(json_keys, children, max_size=6),
    ),
    max_leaves=40,
)


def _huge(longest: int) -> st.SearchStrategy[str]:
    chars = st.sampled_from(["x", " ", "\u00e9", "\U0001F600", "\x00", "7"])
    return st.builds(lambda char, n: char * n, chars, st.integers(5_000, longest))


huge_strings = _huge(60_000)
weird_values = st.one_of(
    st.sampled_from(SPECIAL_SCALARS),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),
    _text_strategy(),
    huge_strings,
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),  # a deep JSON *string* (e.g. a Flow's response_json)
    json_values,
    st.integers(1, 200).map(lambda n: _nest(n)),
)


def _nest(depth: int) -> Any:
    node: Any = {"body": "deep"}
    for i in range(depth):
        node = [node] if i % 2 else {"value": node}
    return node


def dumps(value: Any, ensure_ascii: bool = False) -> bytes:
    """JSON bytes; lone surrogates cannot be UTF-8, so they are sent escaped (as Meta would)."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, allow_nan=True).encode("ascii")


# Headers that are not Meta's signature of the body: missing, empty, forged, another secret's,
# garbage of every byte a header can carry.
header_bytes = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)


BAD_SIGNATURE_SHARE = st.sampled_from([False] * 9 + [True])  # ~1 in 10 posts is unsigned or forged


@st.composite
def bad_headers(draw: Any, body: bytes) -> Tuple[str, Optional[bytes]]:
    kind = draw(st.sampled_from(["none", "empty", "zeros", "other_secret", "other_body", "ascii", "latin1", "truncated"]))
    if kind == "none":
        return kind, None
    if kind == "empty":
        return kind, b""
    if kind == "zeros":
        return kind, b"sha256=" + b"0" * 64
    if kind == "other_secret":
        return kind, sign(body, "not-the-app-secret").encode()
    if kind == "other_body":
        return kind, sign(body + b" ", SECRET).encode()
    if kind == "truncated":
        return kind, sign(body, SECRET)[:-1].encode()
    text = draw(header_bytes)
    if kind == "ascii":
        text = text.encode("latin-1").decode("ascii", "ignore")
    return kind, text.encode("latin-1")


# --- strategy 1: random JSON and random bytes ------------------------------------------------


@st.composite
def skeletons(draw: Any) -> Any:
    """A webhook's outline with random innards, so random data gets past the first checks."""
    def item() -> Any:
        return draw(st.one_of(
            json_values,
            st.dictionaries(st.sampled_from(VOCAB_KEYS), st.one_of(json_leaves, json_values), max_size=8),
        ))

    messages = [item() for _ in range(draw(st.integers(0, 4)))]
    value = draw(st.dictionaries(st.sampled_from(VOCAB_KEYS), json_values, max_size=4))
    value.update({
        "metadata": {"phone_number_id": PHONE_NUMBER_ID, "display_phone_number": DISPLAY_NUMBER},
        draw(st.sampled_from(["messages", "statuses", "calls", "user_preferences", "errors", "contacts"])): messages,
    })
    change = {"field": draw(st.sampled_from(["messages", "calls", "user_preferences", "account_update"]) | json_leaves), "value": value}
    return {"object": WABA, "entry": [{"id": "1", "changes": [change]}]}


raw_bodies = st.one_of(
    json_values.map(dumps),
    st.builds(lambda entry: dumps({"object": WABA, "entry": entry}), json_values),
    skeletons().map(dumps),
    st.binary(max_size=2000),
    st.binary(max_size=200).map(lambda junk: b'{"object": "' + WABA.encode() + b'", "entry": [' + junk),
    # valid JSON in other encodings json.loads still detects, truncated, and with junk bytes
    st.builds(lambda value, codec: json.dumps(value).encode(codec), json_values, st.sampled_from(["utf-16", "utf-32", "utf-8-sig"])),
    st.builds(lambda value, cut: dumps(value)[:cut], skeletons(), st.integers(0, 400)),
    st.builds(lambda value, junk: dumps(value) + junk, skeletons(), st.binary(min_size=1, max_size=8)),
    # deep nesting, as an array, as objects, and inside a real webhook
    st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 20_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(1, 20_000).map(lambda n: dumps(webhook("text"))[:-1] + b', "x": ' + b"[" * n + b"]" * n + b"}"),
)


@given(body=raw_bodies, data=st.data())
@example(body=b"[" * 100_000 + b"]" * 100_000, data=None).via("RecursionError in json.loads -> 500")
@example(body=b"{}", data="latin1").via("non-ASCII X-Hub-Signature-256 -> TypeError in hmac.compare_digest -> 500")
@settings(FUZZ, max_examples=EXAMPLES)
def test_random_bodies_never_500(body: bytes, data: Any) -> None:
    if data is None:
        kind, header = "valid", signed(body)
    elif data == "latin1":
        kind, header = "latin1", "sha256=\u00e9".encode("latin-1")
    elif not data.draw(BAD_SIGNATURE_SHARE, label="badly signed"):
        kind, header = "valid", signed(body, data.draw(st.sampled_from(["exact", "exact", "upper", "padded"])))
    else:
        kind, header = data.draw(bad_headers(body), label="bad header")
    outcome = exchange(body, header)
    if kind == "valid":
        allowed = expected_for_signed(body)
    elif kind == "none":
        allowed = {401}
    else:
        allowed = {401, 403}
    check_common(outcome, allowed, body)


# --- strategy 2: mutated real fixtures -------------------------------------------------------


DEEP = "\u0000__DEEP_SPLICE__\u0000"


def _paths(node: Any, path: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, path + (key,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, path + (index,))
    return found


def _get(root: Any, path: Tuple[Any, ...]) -> Any:
    for step in path:
        root = root[step]
    return root


def _set(root: Any, path: Tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


def _as_int(text: str) -> Optional[int]:
    try:
        return int(text) if len(text) < 1000 else None
    except ValueError:
        return None


def _coerce(draw: Any, node: Any) -> Any:
    """The same value as another JSON type, or the kind of near-miss Meta's strings invite."""
    if isinstance(node, bool):
        return draw(st.sampled_from([str(node).lower(), int(node), None]))
    if isinstance(node, int):
        small = abs(node) < 10**300
        return draw(st.sampled_from([str(node), -node, float(node) if small else 1e300, node * 10**300 if small else node, [node], 0]))
    if isinstance(node, float):
        return draw(st.sampled_from([str(node), int(node) if math.isfinite(node) else 0, -node]))
    if isinstance(node, str):
        options = [node.upper(), " " + node + " ", node + "\x00", node[: len(node) // 2], [node], {"body": node}]
        if len(node) < 1000:
            options.append(node * 50)
        number = _as_int(node)
        if number is not None:
            options += [number, -number, float(number) if abs(number) < 10**300 else 1e300, node + "0" * 300, "-" + node, "0" * 50 + node]
        return draw(st.sampled_from(options))
    if isinstance(node, list):
        return draw(st.sampled_from([{}, "", None, {str(i): v for i, v in enumerate(node)}]))
    if isinstance(node, dict):
        return draw(st.sampled_from([[], "", None, list(node.values()), [node, node]]))
    return draw(weird_values)


@st.composite
def mutated_fixtures(draw: Any) -> Tuple[str, int, bytes]:
    name = draw(st.sampled_from(FIXTURES), label="fixture")
    root: Any = webhook(name)
    operations = draw(st.integers(1, 6), label="mutations")
    for _ in range(operations):
        paths = _paths(root)
        # Mostly inside one item (a message, status, call...), so its siblings still parse.
        inside = [p for p in paths if len(p) > 7]
        path = draw(st.sampled_from(inside if inside and draw(st.booleans()) else paths), label="path")
        node = _get(root, path)
        parent = _get(root, path[:-1]) if path else None
        op = draw(st.sampled_from([
            "replace", "replace", "replace", "coerce", "coerce", "delete", "delete", "duplicate",
            "wrap_list", "wrap_dict", "unwrap", "add_key", "transplant", "empty", "deep",
        ]), label="op")
        if op == "replace":
            root = _set(root, path, draw(weird_values))
        elif op == "coerce":
            root = _set(root, path, _coerce(draw, node))
        elif op == "delete" and path:
            del parent[path[-1]]
        elif op == "duplicate":
            if isinstance(node, list) and node:
                index = draw(st.integers(0, len(node) - 1))
                node.insert(draw(st.integers(0, len(node))), copy.deepcopy(node[index]))
            elif path and isinstance(parent, list):
                parent.insert(path[-1], copy.deepcopy(node))
            elif path and isinstance(parent, dict):
                parent[path[-1]] = [copy.deepcopy(node), copy.deepcopy(node)]
        elif op == "wrap_list":
            root = _set(root, path, [node])
        elif op == "wrap_dict":
            root = _set(root, path, {draw(json_keys): node})
        elif op == "unwrap":
            if isinstance(node, list) and node:
                root = _set(root, path, node[0])
            elif isinstance(node, dict) and node:
                root = _set(root, path, list(node.values())[0])
        elif op == "add_key" and isinstance(node, dict):
            node[draw(st.sampled_from(VOCAB_KEYS) | json_keys)] = draw(weird_values)
        elif op == "transplant":
            donor = copy.deepcopy(_get(root, draw(st.sampled_from(paths), label="donor")))
            root = _set(root, path, donor)
        elif op == "empty":
            root = _set(root, path, type(node)() if isinstance(node, (dict, list, str)) else None)
        elif op == "deep":
            root = _set(root, path, DEEP)
    body = dumps(root, ensure_ascii=draw(st.booleans(), label="ascii"))
    splice = json.dumps(DEEP).encode()
    if splice in body:
        depth = draw(st.integers(1, 5000), label="depth")
        body = body.replace(splice, b"[" * depth + b"]" * depth)
    return name, operations, body


def _fixture_with(name: str, path: Tuple[Any, ...], value: Any) -> bytes:
    body = webhook(name)
    _set(body, path, value)
    return dumps(body)


CHANGE_0 = ("entry", 0, "changes", 0, "value")
MESSAGE_0 = ("entry", 0, "changes", 0, "value", "messages", 0)
STATUS_0 = ("entry", 0, "changes", 0, "value", "statuses", 0)


@given(case=mutated_fixtures(), data=st.data())
@example(case=("text", 0, _fixture_with("text", MESSAGE_0 + ("timestamp",), "9" * 400)), data=None).via(
    "timestamp beyond float range: float(message.timestamp) in _hand_to_rasa -> OverflowError -> 500"
)
@example(case=("location", 0, _fixture_with("location", MESSAGE_0 + ("location", "latitude"), 10**400)), data=None).via(
    "latitude beyond float range: float() in _coordinate raises OverflowError, not ValueError -> 500"
)
@example(case=("interactive_flow_nfm_reply", 0, _fixture_with(
    "interactive_flow_nfm_reply", MESSAGE_0 + ("interactive", "nfm_reply", "response_json"), "[" * 100_000,
)), data=None).via("deep response_json: RecursionError in _flow's json.loads -> 500")
@example(case=("status_failed_131047", 0, _fixture_with("status_failed_131047", STATUS_0 + ("timestamp",), "9" * 400)), data=None).via(
    "131047 status with a timestamp beyond float range: 'A background WhatsApp job failed' (OverflowError)"
)
@example(case=("call_connect", 0, _fixture_with("call_connect", CHANGE_0 + ("calls", 0, "timestamp"), "9" * 400)), data=None).via(
    "call timestamp beyond float range: float(call.timestamp) in _handle_call -> OverflowError -> 500"
)
@example(case=("system_user_changed_number", 0, _fixture_with(
    "system_user_changed_number", MESSAGE_0 + ("timestamp",), "9" * 400,
)), data=None).via("system message timestamp beyond float range: float() in _handle_system_change -> 500")
@settings(FUZZ, max_examples=EXAMPLES + EXAMPLES // 4)
def test_mutated_fixtures_never_500(case: Tuple[str, int, bytes], data: Any) -> None:
    _, _, body = case
    if data is not None and data.draw(BAD_SIGNATURE_SHARE, label="badly signed"):
        kind, header = data.draw(bad_headers(body), label="bad header")
        allowed = {401} if kind == "none" else {401, 403}
    else:
        header, allowed = signed(body), expected_for_signed(body)
    check_common(exchange(body, header), allowed, body)


# --- strategy 3: valid batches mixed with broken items ---------------------------------------


@dataclass(frozen=True)
class Customer:
    wa_id: Optional[str]
    user_id: Optional[str]
    name: str

    @property
    def sender_id(self) -> str:
        return self.wa_id or self.user_id or ""


@dataclass
class Valid:
    """A message that must reach Rasa (unless its text is blank: then it must not)."""

    customer: Customer
    raw: Dict[str, Any]
    expected_text: Optional[str]
    timestamp: int


@dataclass
class Either:
    """An odd but parseable item (its wamid starts with wamid.EITHER): whether it reaches Rasa is
    not specified here, but it must not take its siblings down with it."""

    raw: Any
    customer: Optional[Customer] = None


@dataclass
class Broken:
    """An item that must never reach Rasa: its wamid, if it has one, starts with wamid.BROKEN."""

    raw: Any
    customer: Optional[Customer] = None


def _said(*candidates: str) -> bool:
    return any(c.strip().upper() in OPT_OUT_KEYWORDS for c in candidates if c)


DIGITS = "0123456789"
customers = st.one_of(
    st.builds(lambda digits, name: Customer(digits, None, name), st.text(DIGITS, min_size=8, max_size=15), _text_strategy(30)),
    st.builds(lambda digits, name: Customer(None, f"US.{digits}", name), st.text(DIGITS, min_size=10, max_size=20), _text_strategy(30)),
)
texts = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=80),
    st.sampled_from([
        "hi", "Where is order 10042?", "stop", " STOP\n", "Unsubscribe", "stop please", "/order_status",
        "/greet{\"name\": \"x\"}", "\u0000", "\x1f\x1c", "   ", "\u3000", "\u200b", "\U0001F44B", "\ud83d",
        "line\nbreak\r\n", "\u202e\u0627\u0644\u0633\u0644\u0627\u0645", "null", "<script>", "%s %d {}",
    ]),
    _huge(8_000),
)
timestamps = st.one_of(st.integers(1, 2**33), st.sampled_from([1, 1732543200, 2**31 - 1, 2**31, 4102444800]))  # up to the year 2242
reply_ids = st.one_of(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=20),
    st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20).map(lambda s: "/" + s),
    st.sampled_from(["stop", "STOP", "/opt_out", "/human_handoff"]),
)
titles = st.one_of(_text_strategy(24), st.sampled_from(["Confirm", "Stop", "\U0001F44D Yes", "Talk to a person"]))


@st.composite
def valid_messages(draw: Any, customer: Customer) -> Valid:
    timestamp = draw(timestamps)
    raw: Dict[str, Any] = {"id": None, "timestamp": draw(st.sampled_from([str(timestamp), timestamp]))}
    if customer.wa_id:
        raw["from"] = customer.wa_id
    else:
        raw["from_user_id"] = customer.user_id
    kind = draw(st.sampled_from(["text", "text", "text", "caption", "button_reply", "list_reply", "button", "location"]))
    if kind == "text":
        body = draw(texts)
        raw.update(type="text", text={"body": body})
        said, expected = [body], body.strip() or None
    elif kind == "caption":
        caption = draw(texts)
        media_id = draw(st.text(DIGITS, min_size=1, max_size=16))
        raw.update(type="image", image={"id": media_id, "mime_type": "image/jpeg", "caption": caption})
        said, expected = [caption], caption.strip() or MEDIA_INTENT
    elif kind == "location":
        place = {"latitude": draw(st.floats(-90, 90)), "longitude": draw(st.floats(-180, 180))}
        for key in ("name", "address"):
            if draw(st.booleans()):
                place[key] = draw(texts)
        raw.update(type="location", location=place)
        # README: /whatsapp_location{"latitude": …, "longitude": …, "name": …, "address": …}, blanks left out
        entities = {key: value for key, value in place.items() if not isinstance(value, str) or value.strip()}
        said, expected = [], LOCATION_INTENT + json.dumps(entities)
    else:
        reply_id, title = draw(reply_ids), draw(titles)
        if kind == "button":
            raw.update(type="button", button={"payload": reply_id, "text": title})
        else:
            raw.update(type="interactive", interactive={"type": kind, kind: {"id": reply_id, "title": title}})
        shown = title if title.strip() else reply_id
        said, expected = [reply_id, title], (reply_id if reply_id.startswith("/") else shown).strip() or None
    if draw(st.booleans()):
        raw["context"] = {"from": DISPLAY_NUMBER, "id": "wamid.CONTEXT" + draw(st.text("ABC0123", max_size=8))}
    if expected is not None and _said(*said):
        expected = OPT_OUT_TEXT
    return Valid(customer, raw, expected, timestamp)


@st.composite
def broken_messages(draw: Any, customer: Customer) -> Broken:
    sender = {"from": customer.wa_id} if customer.wa_id else {"from_user_id": customer.user_id}
    base = {**sender, "id": "wamid.BROKEN", "timestamp": "1732543200", "type": "text", "text": {"body": "must not arrive"}}
    kind = draw(st.sampled_from([
        "no_id", "blank_id", "no_type", "bad_timestamp", "not_object", "media_without_object",
        "reaction", "blank_text", "text_not_string", "unsupported", "system", "revoke", "status", "status_131047",
    ]))
    raw: Any = dict(base)
    if kind == "no_id":
        del raw["id"]
    elif kind == "blank_id":
        raw["id"] = draw(st.sampled_from(["", " ", None, [], {}, True]))
    elif kind == "no_type":
        del raw["type"]
    elif kind == "bad_timestamp":
        raw["timestamp"] = draw(st.sampled_from(["", "0", "-1", "abc", "1.5", None, True, False, [], {}, 0, -5, 1.5, "-1732543200"]))
    elif kind == "not_object":
        raw = draw(st.sampled_from([None, 5, "text", [], [dict(base)], True]))
    elif kind == "media_without_object":
        raw.update(type=draw(st.sampled_from(["image", "audio", "video", "document", "sticker"])), text=None)
    elif kind == "reaction":
        raw.update(type="reaction", reaction={"message_id": "wamid.X", "emoji": "\U0001F44D"})
    elif kind == "blank_text":
        raw["text"] = {"body": draw(st.sampled_from(["", " ", "\n\t", "\u3000", "\x1c\x1d\x1e\x1f", "\u2028"]))}
    elif kind == "text_not_string":
        raw["text"] = draw(st.sampled_from([{"body": None}, {"body": []}, {"body": {}}, {"body": True}, "hi", [], None, {}]))
    elif kind == "unsupported":
        raw.update(type="unsupported", errors=[{"code": 131051, "title": "Message type unknown"}])
    elif kind == "system":
        raw.update(type="system", system={"type": "user_changed_number", "body": "changed", "new_wa_id": "15550000000"})
    elif kind == "revoke":
        raw.update(type="revoke", revoke={"original_message_id": "wamid.X"})
    else:
        status = {
            "id": "wamid.BROKEN.status",
            "status": "failed" if kind == "status_131047" else draw(st.sampled_from(["sent", "delivered", "read", "failed"])),
            "timestamp": "1732630000", "recipient_id": customer.sender_id,
        }
        if kind == "status_131047":
            status["errors"] = [{"code": 131047, "title": "Re-engagement message"}]
        return Broken(("status", status), customer)
    return Broken(raw, customer)


@st.composite
def odd_messages(draw: Any, customer: Customer) -> Either:
    sender = {"from": customer.wa_id} if customer.wa_id else {"from_user_id": customer.user_id}
    raw = {**sender, "id": f"wamid.EITHER.{draw(st.integers(0, 10**6))}", "timestamp": "1732543200"}
    kind = draw(st.sampled_from(["deep_flow_response", "huge_numbers", "location_out_of_range", "edit_of_nothing"]))
    if kind == "deep_flow_response":  # a Flow's response_json nested deeper than json.loads can go
        raw.update(type="interactive", interactive={"type": "nfm_reply", "nfm_reply": {
            "name": "flow", "body": "Sent", "response_json": "[" * draw(st.sampled_from([2_000, 100_000])),
        }})
    elif kind == "huge_numbers":
        raw.update(type="order", order={"catalog_id": "1", "product_items": [
            {"product_retailer_id": "x", "quantity": 10**400, "item_price": "1e999", "currency": "EUR"},
        ]})
    elif kind == "location_out_of_range":
        raw.update(type="location", location={"latitude": draw(st.sampled_from([10**400, "1e999", 91, "nan"])), "longitude": 0})
    else:
        raw.update(type="edit", edit={"original_message_id": "wamid.X", "message": draw(json_values)})
    return Either(raw, customer)


BROKEN_CONTAINERS = [
    "entry_not_object", "entry_without_changes", "change_not_object", "value_not_object", "no_metadata", "notice_field", "odd_field",
]


@dataclass
class Batch:
    body: Dict[str, Any]
    valid: List[Valid]  # in document order


@st.composite
def batches(draw: Any) -> Batch:
    people = draw(st.lists(customers, min_size=1, max_size=5, unique_by=lambda c: c.sender_id))
    items: List[Any] = []
    for _ in range(draw(st.integers(1, 12), label="items")):
        customer = draw(st.sampled_from(people))
        if draw(st.sampled_from([False, False, False, True]), label="broken"):
            items.append(draw(broken_messages(customer)))
        elif draw(st.sampled_from([False] * 9 + [True]), label="odd"):
            items.append(draw(odd_messages(customer)))
        else:
            items.append(draw(valid_messages(customer)))
    # Split the items, in order, across entries and changes; then sprinkle broken containers.
    entries: List[Any] = []
    position = 0
    while position < len(items):
        changes: List[Any] = []
        for _ in range(draw(st.integers(1, 3))):
            if position >= len(items):
                break
            size = draw(st.integers(1, len(items) - position))
            chunk, position = items[position:position + size], position + size
            changes.append(_change(draw, chunk))
        entries.append({"id": "102290129340398", "time": 1732543200, "changes": changes})
    for _ in range(draw(st.integers(0, 3), label="broken containers")):
        kind = draw(st.sampled_from(BROKEN_CONTAINERS))
        decoy = _change(draw, [Valid(people[0], {
            "from": people[0].wa_id, "from_user_id": people[0].user_id, "id": "wamid.BROKEN.container",
            "timestamp": "1732543200", "type": "text", "text": {"body": "must not arrive"},
        }, None, 1732543200)])
        if kind in ("entry_not_object", "entry_without_changes"):
            entry = draw(st.sampled_from([None, 5, "entry", []])) if kind == "entry_not_object" else draw(
                st.sampled_from([{"id": "1"}, {"id": "1", "changes": None}, {"changes": decoy}, {"changes": "x"}]))
            entries.insert(draw(st.integers(0, len(entries))), entry)
            continue
        if kind == "change_not_object":
            change: Any = draw(st.sampled_from([None, 1, "change", [decoy]]))
        elif kind == "value_not_object":
            change = {"field": "messages", "value": draw(st.sampled_from([None, [], "v", [decoy["value"]]]))}
        elif kind == "no_metadata":
            value = dict(decoy["value"])
            value["metadata"] = draw(st.sampled_from(
                [None, {}, {"phone_number_id": ""}, {"phone_number_id": " "}, {"phone_number_id": None}, [], "x"]
            ))
            change = {"field": "messages", "value": value}
        elif kind == "notice_field":
            field_name = draw(st.sampled_from(["account_update", "message_template_status_update", "calls", "user_preferences"]))
            change = {"field": field_name, "value": decoy["value"]}
        else:
            change = {"field": draw(st.sampled_from([None, "", 7, [], {}, "Messages"])), "value": decoy["value"]}
        host = draw(st.sampled_from([e for e in entries if isinstance(e, dict) and isinstance(e.get("changes"), list)]))
        host["changes"].insert(draw(st.integers(0, len(host["changes"]))), change)
    body = {"object": WABA, "entry": entries}
    valid = [item for item in items if isinstance(item, Valid)]
    return Batch(body, valid)


def _change(draw: Any, chunk: List[Any]) -> Dict[str, Any]:
    messages: List[Any] = []
    statuses: List[Any] = []
    for item in chunk:
        if isinstance(item, Broken) and isinstance(item.raw, tuple):
            statuses.append(item.raw[1])
        else:
            messages.append(item.raw)
    value: Dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": DISPLAY_NUMBER, "phone_number_id": PHONE_NUMBER_ID},
        "messages": messages,
    }
    if statuses:
        value["statuses"] = statuses
    # Meta lists one contact per customer of the value (sometimes none at all).
    if draw(st.integers(0, 4)):
        people = {item.customer for item in chunk if item.customer is not None}
        contacts = []
        for person in sorted(people, key=lambda c: c.sender_id):
            contact: Dict[str, Any] = {"profile": {"name": person.name}}
            if person.wa_id:
                contact["wa_id"] = person.wa_id
            else:
                contact["user_id"] = person.user_id
                contact["profile"]["username"] = "@" + person.user_id.lower()
            contacts.append(contact)
        value["contacts"] = contacts
    return {"field": "messages", "value": value}


def _one_value_batch(*raws: Dict[str, Any]) -> Batch:
    """An explicit example: one customer's messages in one value; `wamid.EITHER...` ids keep."""
    customer = Customer("16315551181", None, "Kerry")
    items = [Either(raw, customer) if str(raw.get("id")).startswith("wamid.EITHER") else Valid(
        customer, raw, raw["text"]["body"], int(raw["timestamp"])) for raw in raws]
    value = {"metadata": {"display_phone_number": DISPLAY_NUMBER, "phone_number_id": PHONE_NUMBER_ID},
             "contacts": [{"profile": {"name": "Kerry"}, "wa_id": "16315551181"}], "messages": [item.raw for item in items]}
    body = {"object": WABA, "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}]}
    return Batch(body, [item for item in items if isinstance(item, Valid)])


def _text_message(body: str, timestamp: int = 1732543200) -> Dict[str, Any]:
    return {"from": "16315551181", "id": None, "timestamp": str(timestamp), "type": "text", "text": {"body": body}}


@given(batch=batches(), ascii_only=st.booleans())
@example(batch=_one_value_batch(_text_message("hi"), {
    "from": "16315551181", "id": "wamid.EITHER.flow", "timestamp": "1732543201", "type": "interactive",
    "interactive": {"type": "nfm_reply", "nfm_reply": {"name": "flow", "body": "Sent", "response_json": "[" * 2000}},
}), ascii_only=True).via("a Flow's response_json nested 2,000 deep: RecursionError in _flow; the whole webhook was 400, 'hi' lost")
@settings(FUZZ, max_examples=EXAMPLES)
def test_every_valid_message_is_delivered_once_in_order(batch: Batch, ascii_only: bool) -> None:
    # Unique wamids per example (the channel may deduplicate by wamid, across examples too).
    run = uuid.uuid4().hex
    for index, item in enumerate(batch.valid):
        item.raw["id"] = f"wamid.FUZZ.{run}.{index}"
    body = dumps(batch.body, ensure_ascii=ascii_only)
    outcome = exchange(body, signed(body))
    check_common(outcome, {200}, body)

    expected: Dict[str, List[Tuple[str, str, int]]] = {}
    for item in batch.valid:
        if item.expected_text is not None:
            expected.setdefault(item.customer.sender_id, []).append((item.raw["id"], item.expected_text, item.timestamp))
    got: Dict[str, List[Tuple[str, str, int]]] = {}
    for message in outcome.delivered:
        assert not message.message_id.startswith("wamid.BROKEN"), f"a broken item reached Rasa: {message.message_id}"
        if message.message_id.startswith("wamid.EITHER"):
            continue
        got.setdefault(message.sender_id, []).append(
            (message.message_id, message.text, message.metadata["whatsapp"]["timestamp"])
        )
    assert got == expected
