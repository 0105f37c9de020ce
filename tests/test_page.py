"""The page's server side: its files, the change stream and the forwarding to the bot (in-process
simulator, a stand-in bot that records what reached it)."""

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connector.simulator import Settings, create_app
from connector.simulator.page import bot_base_url


@pytest.fixture
async def bot():
    seen = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, request.headers.get("Authorization"), await request.text()))
        return web.json_response({"path": request.path}, status=201)

    app = web.Application()
    app.router.add_route("*", "/webhooks/whatsapp/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/webhooks/whatsapp/webhook")), seen
    await server.close()


async def simulator(webhook_url: str) -> TestClient:
    client = TestClient(TestServer(create_app(Settings(
        access_token="t", phone_number_id="106540352242922", app_secret="s", display_phone_number="15550001234",
        bot_webhook_url=webhook_url)), host="127.0.0.1"))
    await client.start_server()
    return client


def test_the_bot_base_url_is_the_webhook_url_without_its_last_step():
    assert bot_base_url("http://127.0.0.1:5005/webhooks/whatsapp/webhook") == "http://127.0.0.1:5005/webhooks/whatsapp"


async def test_the_page_and_its_files_are_served():
    sim = await simulator("http://127.0.0.1:9/webhooks/whatsapp/webhook")
    try:
        index = await sim.get("/")
        assert index.status == 200 and "<title>WhatsApp simulator" in await index.text()
        for name in ("app.js", "style.css"):
            assert (await sim.get(f"/page/{name}")).status == 200
    finally:
        await sim.close()


async def test_the_bot_is_reached_with_the_token_of_each_route(bot, monkeypatch):
    url, seen = bot
    monkeypatch.setenv("RASA_AUTH_TOKEN", "view-token")
    monkeypatch.setenv("WHATSAPP_AGENT_TOKEN", "agent-token")
    sim = await simulator(url)
    try:
        view = await sim.get("/_sim/bot/conversations/4915112345678")
        assert view.status == 201 and (await view.json())["path"] == "/webhooks/whatsapp/conversations/4915112345678"
        sent = await sim.post("/_sim/bot/agent/conversations/4915112345678/messages", data=b'{"text": "hi"}')
        assert sent.status == 201
        assert seen == [
            ("GET", "/webhooks/whatsapp/conversations/4915112345678", "Bearer view-token", ""),
            ("POST", "/webhooks/whatsapp/agent/conversations/4915112345678/messages", "Bearer agent-token", '{"text": "hi"}'),
        ]
        assert (await sim.get("/_sim/bot/webhook")).status == 404  # only the view and the agent API
        assert len(seen) == 2
    finally:
        await sim.close()


async def test_a_missing_token_or_a_bot_not_up_is_said_plainly(monkeypatch):
    monkeypatch.delenv("WHATSAPP_AGENT_TOKEN", raising=False)
    monkeypatch.setenv("RASA_AUTH_TOKEN", "view-token")
    sim = await simulator("http://127.0.0.1:9/webhooks/whatsapp/webhook")
    try:
        no_token = await sim.get("/_sim/bot/agent/conversations")
        assert no_token.status == 503 and "WHATSAPP_AGENT_TOKEN" in (await no_token.json())["error"]
        down = await sim.get("/_sim/bot/conversations/4915112345678")
        assert down.status == 502 and "the bot is not up yet" in (await down.json())["error"]
    finally:
        await sim.close()


async def test_the_change_stream_tells_of_every_change():
    sim = await simulator("http://127.0.0.1:9/webhooks/whatsapp/webhook")
    try:
        stream = await sim.get("/_sim/events")
        assert stream.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(stream.content.readline(), 5)
        assert first.startswith(b"data: ")
        await stream.content.readline()  # the blank line ending the event
        await sim.post("/_sim/clock", json={"advance": 3600})
        second = await asyncio.wait_for(stream.content.readline(), 5)
        assert second.startswith(b"data: ") and int(second.split()[1]) > int(first.split()[1])
        stream.close()
    finally:
        await sim.close()
