"""Desk events against a real HTTP server: signed, kept until taken, one customer's in order,
refused ones dropped, everything else retried."""

import asyncio
import json

from aiohttp import web

from connector.care_state import CareState
from connector.care_state.memory import MemoryBackend
from connector.desk import Desk
from connector.signature import sign


async def started_desk(answers):
    """A desk answering each POST with the next status of `answers` (then 200); what it took."""
    taken = []

    async def receive(request):
        body = await request.read()
        assert request.headers["X-Signature-256"] == sign(body, "agent-key")
        status = answers.pop(0) if answers else 200
        if status == 200:
            taken.append(json.loads(body))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/events", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/events", taken


async def clock():
    return 1767225600.0


async def wait_for(condition, timeout=10):
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_events_are_signed_kept_while_the_desk_is_down_and_delivered_in_order():
    runner, url, taken = await started_desk([503, 404, 401])
    state = CareState(MemoryBackend())
    desk = Desk(url, "agent-key", lambda: state, clock, backlog_limit=10, idle_seconds=0.05)
    try:
        desk.start("test:1")
        for n in range(3):
            await desk.emit("4915100000001", "message", event_id=f"message:{n}", text=f"m{n}")
        await desk.emit("4915100000002", "handoff", reason="other customer")
        await wait_for(lambda: len(taken) == 4)
        mine = [e for e in taken if e["sender_id"] == "4915100000001"]
        assert [e["text"] for e in mine] == ["m0", "m1", "m2"]
        assert mine[0] == {"id": "message:0", "event": "message", "sender_id": "4915100000001",
                           "at": 1767225600.0, "text": "m0"}
        assert await state.desk_backlog("4915100000001") == []
    finally:
        await desk.stop()
        await runner.cleanup()
        state.close()


async def test_an_event_the_desk_refuses_is_dropped_and_does_not_hold_up_the_next():
    runner, url, taken = await started_desk([422])
    state = CareState(MemoryBackend())
    desk = Desk(url, "agent-key", lambda: state, clock, backlog_limit=10, idle_seconds=0.05)
    try:
        desk.start("test:1")
        await desk.emit("4915100000003", "message", event_id="message:bad", text="bad")
        await desk.emit("4915100000003", "message", event_id="message:good", text="good")
        await wait_for(lambda: len(taken) == 1)
        assert taken[0]["text"] == "good"
    finally:
        await desk.stop()
        await runner.cleanup()
        state.close()


async def test_a_full_backlog_drops_new_events_and_says_so(caplog):
    state = CareState(MemoryBackend())
    desk = Desk("http://127.0.0.1:9/events", "agent-key", lambda: state, clock, backlog_limit=2)
    try:
        for n in range(4):
            await desk.emit("4915100000004", "message", event_id=f"message:{n}", text=f"m{n}")
        assert [e.event_id for e in await state.desk_backlog("4915100000004")] == ["message:0", "message:1"]
        assert caplog.text.count("desk_backlog_limit") == 1
    finally:
        state.close()


async def test_without_a_desk_nothing_is_kept():
    state = CareState(MemoryBackend())
    desk = Desk("", "", lambda: state, clock, backlog_limit=2)
    await desk.emit("4915100000005", "message", text="hi")
    assert await state.desk_backlog("4915100000005") == []
    state.close()
