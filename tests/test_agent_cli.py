"""`python -m connector.simulator agent ...` against a small fake agent API on a loopback port:
the real CLI `main([...])`, the requests it makes and what it prints. No Rasa involved."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Dict, List, Tuple

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connector.simulator import cli

TOKEN = "agent-secret"
CUSTOMER = "4915112345678"
OTHER = "4915187654321"
BASE = "/webhooks/whatsapp/agent"
HINT = f"python -m connector.simulator agent template {CUSTOMER} <name>"


class FakeAgentApi:
    """Answers canned (status, JSON) per (method, path) and records every request."""

    def __init__(self) -> None:
        self.requests: List[Dict[str, Any]] = []
        self.answers: Dict[Tuple[str, str], Tuple[int, Any]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append({
            "method": request.method, "path": request.raw_path,
            "auth": request.headers.get("Authorization"), "body": await request.json() if raw else None,
        })
        status, body = self.answers.get((request.method, request.raw_path), (500, {"error": "not scripted"}))
        return web.json_response(body, status=status)


@pytest.fixture
async def api(monkeypatch):
    fake = FakeAgentApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    monkeypatch.setenv("RASA_URL", fake.url)
    monkeypatch.setenv("WHATSAPP_AGENT_TOKEN", TOKEN)
    yield fake
    await server.close()


async def run(*argv: str) -> int:
    """The CLI runs its own event loop (asyncio.run), so it gets a thread; the fake API stays on ours."""
    return await asyncio.to_thread(cli.main, ["agent", *argv])


def hhmm(ts: float) -> str:
    """How the CLI prints a time: UTC HH:MM, with the date when it is not today."""
    today = time.gmtime(ts)[:3] == time.gmtime()[:3]
    return time.strftime("%H:%M" if today else "%Y-%m-%d %H:%M", time.gmtime(ts))


def only_request(api: FakeAgentApi) -> Dict[str, Any]:
    assert len(api.requests) == 1, api.requests
    request = api.requests[0]
    assert request["auth"] == f"Bearer {TOKEN}"
    return request


async def test_list_shows_who_since_when_why_and_the_window(api, capsys):
    now = time.time()
    api.answers[("GET", f"{BASE}/conversations")] = (200, {"conversations": [
        {"sender_id": CUSTOMER, "since": now - 12 * 60 - 5, "reason": "asked for a person",
         "last_inbound_at": now - 60, "window_expires_at": now + 3 * 3600 + 12 * 60 + 30},
        {"sender_id": OTHER, "since": now - 26 * 3600, "reason": None,
         "last_inbound_at": now - 30 * 3600, "window_expires_at": now - 6 * 3600},
    ]})
    assert await run("list") == 0
    request = only_request(api)
    assert (request["method"], request["path"]) == ("GET", f"{BASE}/conversations")
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first.startswith(CUSTOMER) and "handed off 12 min ago (asked for a person)" in first
    assert "window open, closes in 3 h 12 min" in first
    assert second.startswith(OTHER) and "handed off 26 h ago;" in second
    assert f"window closed since {hhmm(now - 6 * 3600)} UTC" in second


async def test_list_with_nothing_handed_off(api, capsys):
    api.answers[("GET", f"{BASE}/conversations")] = (200, {"conversations": []})
    assert await run("list") == 0
    assert "no conversation is handed off" in capsys.readouterr().out


async def test_show_prints_the_header_then_the_messages(api, capsys):
    now = time.time()
    api.answers[("GET", f"{BASE}/conversations/{CUSTOMER}")] = (200, {
        "sender_id": CUSTOMER, "paused": True, "window_open": True, "expires_at": now + 2 * 3600 + 90,
        "opt_in": True, "templates_left": 2, "templates": ["order_update", "hello_world"],
        "handoff": {"since": now - 300, "reason": "asked for a person"},
        "messages": [
            {"at": now - 400, "direction": "in", "by": "customer", "type": "text", "text": "I want a human",
             "template": None, "decision": None, "status": None, "reason": None},
            {"at": now - 390, "direction": "out", "by": "bot", "type": "text", "text": "One moment",
             "template": None, "decision": "free_form", "status": "read", "reason": None},
            {"at": now - 380, "direction": "out", "by": "bot", "type": "text", "text": "Anything else?",
             "template": None, "decision": "suppressed", "status": None, "reason": "handed off"},
            {"at": now - 100, "direction": "out", "by": "agent", "type": "template", "text": None,
             "template": "order_update", "decision": "template", "status": "delivered", "reason": None},
            {"at": now - 50, "direction": "out", "by": "agent", "type": "text", "text": "Hello?",
             "template": None, "decision": "failed", "status": "failed", "reason": "undeliverable", "code": 131026},
        ],
        "desk_backlog": [{"event": "handoff", "at": now - 300, "attempts": 3, "error": "desk unreachable"}],
    })
    assert await run("show", CUSTOMER) == 0
    request = only_request(api)
    assert (request["method"], request["path"]) == ("GET", f"{BASE}/conversations/{CUSTOMER}")
    out = capsys.readouterr().out
    assert f"conversation {CUSTOMER}" in out
    assert "paused, handed off 5 min ago (asked for a person)" in out
    assert "care window:   open, closes in 2 h 1 min" in out
    assert "opt-in:        yes" in out
    assert "templates:     2 left; available: order_update, hello_world" in out
    assert "desk backlog:  1 event(s)" in out and "3 attempt(s): desk unreachable" in out
    lines = out.splitlines()
    assert f"[{hhmm(now - 400)}] > customer: I want a human" in lines
    assert f"[{hhmm(now - 390)}] < bot: One moment  (read)" in lines
    assert f"[{hhmm(now - 380)}] < bot: Anything else?  [suppressed: handed off]" in lines
    assert f"[{hhmm(now - 100)}] < agent: [template order_update]  (delivered)" in lines
    assert f"[{hhmm(now - 50)}] < agent: Hello?  [failed 131026: undeliverable]" in lines


async def test_show_of_a_closed_window_not_handed_off(api, capsys):
    expired = time.time() - 7200
    api.answers[("GET", f"{BASE}/conversations/{CUSTOMER}")] = (200, {
        "sender_id": CUSTOMER, "paused": False, "window_open": False, "expires_at": None, "expired_at": expired,
        "opt_in": None, "templates_left": 0, "templates": [], "handoff": None, "messages": [], "desk_backlog": []})
    assert await run("show", CUSTOMER) == 0
    out = capsys.readouterr().out
    assert "answering (not handed off)" in out and f"closed since {hhmm(expired)} UTC" in out
    assert "opt-in:        unknown" in out and "0 left; available: none" in out and "desk backlog:  0" in out


async def test_reply_200_joins_the_words_and_says_what_was_sent(api, capsys):
    api.answers[("POST", f"{BASE}/conversations/{CUSTOMER}/messages")] = (
        200, {"decision": "free_form", "wamid": "wamid.ABC"})
    assert await run("reply", CUSTOMER, "Hi,", "this is Ada", "from support") == 0
    request = only_request(api)
    assert (request["method"], request["path"]) == ("POST", f"{BASE}/conversations/{CUSTOMER}/messages")
    assert request["body"] == {"text": "Hi, this is Ada from support"}
    assert capsys.readouterr().out.strip() == "sent (free_form, wamid wamid.ABC)"


async def test_reply_409_explains_the_closed_window_and_hints_at_templates(api, capsys):
    expired = time.time() - 3600
    api.answers[("POST", f"{BASE}/conversations/{CUSTOMER}/messages")] = (409, {
        "error": "care_window_closed", "window_open": False, "expired_at": expired, "opt_in": True,
        "templates_left": 2, "templates": ["order_update", "hello_world"],
        "reason": "the customer last wrote 25 h ago"})
    assert await run("reply", CUSTOMER, "still there?") == 1
    assert only_request(api)["body"] == {"text": "still there?"}
    err = capsys.readouterr().err
    assert "refused: the care window is closed" in err
    assert f"closed at {hhmm(expired)} UTC; opt-in yes; 2 template(s) left" in err
    assert "send one of these templates instead: order_update, hello_world" in err and HINT in err
    assert "nothing was sent; the bot says: the customer last wrote 25 h ago" in err


async def test_reply_409_with_no_template_left(api, capsys):
    api.answers[("POST", f"{BASE}/conversations/{CUSTOMER}/messages")] = (409, {
        "error": "care_window_closed", "window_open": False, "expired_at": None, "opt_in": False,
        "templates_left": 0, "templates": [], "reason": None})
    assert await run("reply", CUSTOMER, "hello") == 1
    err = capsys.readouterr().err
    assert "the customer never wrote; opt-in no; 0 template(s) left" in err
    assert "no template can be sent either" in err and HINT not in err


@pytest.mark.parametrize("status, answer, expected", [
    (400, {"error": "text must be a non-empty string"}, "(400): text must be a non-empty string"),
    (502, {"error": "send_failed", "code": 131026, "reason": "message undeliverable"},
     "send failed: WhatsApp error 131026: message undeliverable"),
])
async def test_reply_400_and_502_print_the_error(api, capsys, status, answer, expected):
    api.answers[("POST", f"{BASE}/conversations/{CUSTOMER}/messages")] = (status, answer)
    assert await run("reply", CUSTOMER, "hello") == 1
    assert expected in capsys.readouterr().err


async def test_template_sends_name_language_and_body_parameters(api, capsys):
    api.answers[("POST", f"{BASE}/conversations/{CUSTOMER}/messages")] = (
        200, {"decision": "template", "wamid": "wamid.T1"})
    argv = ("template", CUSTOMER, "order_status_update", "--language", "es", "--body", "A-17", "shipped")
    assert await run(*argv) == 0
    assert only_request(api)["body"] == {
        "template": {"name": "order_status_update", "language": "es", "body": ["A-17", "shipped"]}}
    assert capsys.readouterr().out.strip() == "sent (template, wamid wamid.T1)"
    api.requests.clear()
    assert await run("template", CUSTOMER, "hello_world") == 0
    assert only_request(api)["body"] == {"template": {"name": "hello_world", "language": "en_US", "body": []}}


async def test_handoff_with_reason_and_resume(api, capsys):
    api.answers[("POST", f"{BASE}/conversations/{CUSTOMER}/handoff")] = (
        200, {"sender_id": CUSTOMER, "paused": True, "changed": True})
    api.answers[("POST", f"{BASE}/conversations/{CUSTOMER}/resume")] = (200, {"sender_id": CUSTOMER, "paused": False})
    assert await run("handoff", CUSTOMER, "--reason", "billing question") == 0
    request = only_request(api)
    assert request["path"] == f"{BASE}/conversations/{CUSTOMER}/handoff"
    assert request["body"] == {"reason": "billing question"}
    out = capsys.readouterr().out
    assert f"{CUSTOMER}: handed off to you; the bot is paused until" in out and f"agent resume {CUSTOMER}" in out
    api.requests.clear()
    assert await run("resume", CUSTOMER) == 0
    request = only_request(api)
    assert (request["method"], request["path"]) == ("POST", f"{BASE}/conversations/{CUSTOMER}/resume")
    assert f"{CUSTOMER}: handed back to the bot; it answers again" in capsys.readouterr().out


async def test_options_override_the_env_before_or_after_the_action(api, capsys, monkeypatch):
    monkeypatch.setenv("RASA_URL", "http://127.0.0.1:9")  # wrong on purpose: the flag wins
    monkeypatch.setenv("WHATSAPP_AGENT_TOKEN", "stale")
    api.answers[("GET", f"{BASE}/conversations")] = (200, {"conversations": []})
    assert await run("--rasa-url", api.url + "/", "list", "--token", TOKEN) == 0
    assert await run("list", "--rasa-url", api.url, "--token", TOKEN) == 0
    assert [r["auth"] for r in api.requests] == [f"Bearer {TOKEN}"] * 2


def test_missing_token_says_to_set_it_and_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("WHATSAPP_AGENT_TOKEN", "")  # empty counts as unset
    assert cli.main(["agent", "list", "--rasa-url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "WHATSAPP_AGENT_TOKEN" in err and "--token" in err


@pytest.mark.parametrize("status, expected", [
    (401, "set WHATSAPP_AGENT_TOKEN or pass --token"),
    (403, "must be the channel's agent_token"),
    (404, "agent API is off"),
])
async def test_auth_and_switched_off_answers_are_explained(api, capsys, status, expected):
    api.answers[("GET", f"{BASE}/conversations")] = (status, {"error": "nope"})
    assert await run("list") == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


async def test_bot_not_up_is_one_line_not_a_traceback(capsys, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("WHATSAPP_AGENT_TOKEN", TOKEN)
    assert await run("reply", CUSTOMER, "hello", "--rasa-url", url) == 1
    err = capsys.readouterr().err
    assert f"the bot is not up at {url}" in err and "Traceback" not in err
