"""The simulator remembers conversations across restarts when given a state file (issue 10):
messages both ways with their statuses, the window anchor, the clock offset, wamids, small media.
Simulators run in-process (aiohttp TestClient: closing it runs the shutdown save) and once as a
real `python -m connector.simulator serve --state-file` process stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connector.simulator import Settings, cli, create_app
from connector.simulator.persist import PERSISTER, VERSION

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "persist-token"
PNID = "106540352242922"
SECRET = "persist-secret"
CUSTOMER = "4915112345678"
LAPSED = "4915187654321"
DAY = 24 * 60 * 60


class Bot:
    """A bot webhook that takes everything and remembers what it got."""

    def __init__(self) -> None:
        self.bodies: List[Dict[str, Any]] = []
        self._changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.read()))
        self._changed.set()
        return web.json_response({"ok": True})

    def values(self) -> List[Dict[str, Any]]:
        return [c["value"] for b in self.bodies for e in b.get("entry", []) for c in e.get("changes", [])]

    def statuses(self) -> List[Dict[str, Any]]:
        return [s for v in self.values() for s in v.get("statuses", [])]

    def messages(self) -> List[Dict[str, Any]]:
        return [m for v in self.values() for m in v.get("messages", [])]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


@pytest.fixture
async def bot():
    bot = Bot()
    app = web.Application()
    app.router.add_post("/webhook", bot.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    bot.url = str(server.make_url("/webhook"))
    yield bot
    await server.close()


@pytest.fixture
async def start(bot):
    """Factory: a running in-process simulator on `state_file`; `await client.close()` stops it."""
    clients: List[TestClient] = []

    async def make(state_file: Any, **overrides: Any) -> TestClient:
        settings = Settings(
            access_token=TOKEN, phone_number_id=PNID, app_secret=SECRET, bot_webhook_url=bot.url,
            state_file=Path(state_file) if state_file is not None else None, **overrides,
        )
        client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def send(sim: TestClient, payload: Dict[str, Any]) -> Dict[str, Any]:
    resp = await sim.post(f"/v23.0/{PNID}/messages", json=payload, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200, await resp.text()
    return await resp.json()


def text(body: str, to: str = CUSTOMER) -> Dict[str, Any]:
    return {"messaging_product": "whatsapp", "to": to, "type": "text", "text": {"body": body}}


def buttons(to: str = CUSTOMER) -> Dict[str, Any]:
    return {"messaging_product": "whatsapp", "to": to, "type": "interactive", "interactive": {
        "type": "button", "body": {"text": "Pick one"},
        "action": {"buttons": [{"type": "reply", "reply": {"id": "/yes", "title": "Yes"}}]}}}


async def customer_says(sim: TestClient, wa_id: str = CUSTOMER, **spec: Any) -> Dict[str, Any]:
    resp = await sim.post(f"/_sim/customers/{wa_id}/messages", json=spec or {"text": "hi"})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def get(sim: TestClient, path: str, status: int = 200) -> Any:
    resp = await sim.get(path)
    assert resp.status == status, await resp.text()
    return await resp.json()


def saved(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text())


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_conversations_clock_and_wamids_survive_a_restart(start, bot, tmp_path):
    path = tmp_path / "state" / "sim.json"  # the directory is created on the first save
    sim = await start(path)
    first = await customer_says(sim, LAPSED, text="anyone there?", name="Lena")
    await sim.post("/_sim/clock", json={"advance": DAY + 3600})  # LAPSED's window closes
    played = await customer_says(sim, text="hi", name="Kai", user_id="DE.123")
    photo = await customer_says(sim, image={"caption": "my parcel"})
    reply = await send(sim, text("hello Kai"))
    menu = await send(sim, buttons())
    late = await send(sim, text("sorry, late", to=LAPSED))  # outside the window: fails with 131047
    rejected = await sim.post(f"/v23.0/{PNID}/messages", json={**text(""), "text": {"body": ""}},
                              headers={"Authorization": f"Bearer {TOKEN}"})
    assert rejected.status == 400
    await bot.wait_for(lambda: len(bot.statuses()) == 3 + 3 + 1)
    burst = await (await sim.post("/_sim/burst", json={"count": 6, "customers": 2})).json()
    media_id = bot.messages()[2]["image"]["id"]

    before = {wa_id: await get(sim, f"/_sim/conversations/{wa_id}") for wa_id in (CUSTOMER, LAPSED, *burst["wa_ids"])}
    listing = await get(sim, "/_sim/conversations")
    clock = await get(sim, "/_sim/clock")
    assert before[CUSTOMER]["window_open"] and not before[LAPSED]["window_open"]
    assert [m["status"] for m in before[CUSTOMER]["messages"]] == ["received", "received", "read", "read"]
    assert before[CUSTOMER]["messages"][2]["statuses"] == ["sent", "delivered", "read"]
    assert before[LAPSED]["messages"][1]["errors"][0]["code"] == 131047
    assert len(before[CUSTOMER]["rejected"]) == 1
    await sim.close()

    file = saved(path)
    assert file["version"] == VERSION and len(file["conversations"]) == 4
    assert file["clock_offset"] == clock["offset"]

    again = await start(path)
    for wa_id, conv in before.items():
        assert await get(again, f"/_sim/conversations/{wa_id}") == conv
    assert await get(again, "/_sim/conversations") == listing
    after = await get(again, "/_sim/clock")
    assert after["offset"] == clock["offset"] and abs(after["now"] - clock["now"]) <= 5
    assert (await get(again, "/_sim/stats"))["accepted"] == 0  # counters are per run

    # wamids still resolve: read receipts for a message from before the restart work
    read = {"messaging_product": "whatsapp", "status": "read", "message_id": played["wamid"], "typing_indicator": {"type": "text"}}
    assert await send(again, read) == {"success": True}
    first_in = (await get(again, f"/_sim/conversations/{CUSTOMER}"))["messages"][0]
    assert (first_in["status"], first_in["read_by_phone_number_id"], first_in["typing_indicator"]) == ("read", PNID, True)
    assert await send(again, {"messaging_product": "whatsapp", "status": "read", "message_id": first["wamid"]}) == {"success": True}
    # a button tap answers the menu sent before the restart; the lapsed customer is still lapsed
    bot.bodies.clear()
    await customer_says(again, button_reply={"id": "/yes", "title": "Yes"})
    assert bot.messages()[0]["context"]["id"] == menu["messages"][0]["id"]
    assert not (await get(again, f"/_sim/conversations/{LAPSED}"))["window_open"]
    # placeholder media of a customer's photo can still be fetched
    media = await again.get(f"/v23.0/{media_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert media.status == 200 and (await media.json())["mime_type"] == "image/jpeg"
    # new ids never collide with remembered ones; bursts play new customers
    new = await send(again, text("and again"))
    known = {m["wamid"] for c in before.values() for m in c["messages"]}
    assert new["messages"][0]["id"] not in known
    assert reply["messages"][0]["id"] in known and late["messages"][0]["id"] in known and photo["wamid"] in known
    more = await (await again.post("/_sim/burst", json={"count": 2})).json()
    assert not set(more["wa_ids"]) & set(burst["wa_ids"])


async def test_changes_are_saved_while_running_debounced_not_per_message(start, tmp_path):
    path = tmp_path / "sim.json"
    sim = await start(path, statuses=())
    persister = sim.server.app[PERSISTER]
    await customer_says(sim)
    await eventually(lambda: path.exists() and len(saved(path)["conversations"]) == 1)
    saves = persister.saves
    result = await (await sim.post("/_sim/burst", json={"count": 500, "customers": 50, "concurrency": 100})).json()
    assert None not in result["wamids"]
    await eventually(lambda: sum(len(c["messages"]) for c in saved(path)["conversations"]) == 501)
    assert persister.saves - saves <= max(4, 4 * result["seconds"] / 0.5)  # at most every 0.5 s, not 500 writes
    assert [p.name for p in tmp_path.iterdir()] == ["sim.json"]  # written to a temp file, then renamed over


async def test_a_2000_message_burst_is_remembered_whole(start, tmp_path):
    path = tmp_path / "sim.json"
    sim = await start(path, statuses=())
    result = await (await sim.post("/_sim/burst", json={"count": 2000, "customers": 200, "concurrency": 200})).json()
    assert result["first_answers"] == {"200": 2000}
    await sim.close()
    again = await start(path)
    assert len((await get(again, "/_sim/conversations"))["conversations"]) == 200
    for n in (0, 1234, 1999):
        read = {"messaging_product": "whatsapp", "status": "read", "message_id": result["wamids"][n]}
        assert await send(again, read) == {"success": True}
    conv = await get(again, f"/_sim/conversations/{result['wa_ids'][7]}")
    assert [m["text"] for m in conv["messages"]] == [f"burst {n}" for n in range(7, 2000, 200)]


@pytest.mark.parametrize("content", [
    b"{not json", b'{"version": 1, "conversations": [{"messages": 3}]}', b'[1, 2]', b"\xff\xfe",
    json.dumps({"version": VERSION + 1, "conversations": []}).encode(),
])
async def test_a_corrupt_file_starts_empty_with_a_warning_and_is_kept_aside(start, tmp_path, caplog, content):
    path = tmp_path / "sim.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="connector.simulator"):
        sim = await start(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in w and "starting empty" in w for w in warnings), warnings
    assert (await get(sim, "/_sim/conversations"))["conversations"] == []
    assert (await get(sim, "/_sim/clock"))["offset"] == 0
    assert (tmp_path / "sim.json.corrupt").read_bytes() == content  # not overwritten by the next save
    await customer_says(sim)
    await sim.close()
    assert [c["wa_id"] for c in saved(path)["conversations"]] == [CUSTOMER]


async def test_missing_or_unusable_file_never_crashes(start, tmp_path, caplog):
    sim = await start(tmp_path / "new.json")  # missing: starts empty, quietly
    assert (await get(sim, "/_sim/conversations"))["conversations"] == []
    await sim.close()
    assert not (tmp_path / "new.json").exists()  # nothing changed, nothing written

    blocked = tmp_path / "a-directory"
    blocked.mkdir()
    (blocked / "keep").write_text("x")
    with caplog.at_level(logging.WARNING, logger="connector.simulator"):
        sim = await start(blocked)
        await customer_says(sim)
        await sim.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(blocked) in w and "cannot read" in w for w in warnings), warnings
    assert any(str(blocked) in w and "cannot save" in w for w in warnings), warnings
    assert (blocked / "keep").read_text() == "x"


async def test_reset_clears_the_file_at_once(start, tmp_path):
    path = tmp_path / "sim.json"
    sim = await start(path)
    await customer_says(sim)
    await sim.post("/_sim/clock", json={"advance": 3600})
    await eventually(lambda: path.exists() and saved(path)["conversations"])
    await customer_says(sim, LAPSED)  # a save is pending when the reset comes
    assert (await sim.post("/_sim/reset")).status == 200
    file = saved(path)  # right after the answer, no waiting
    assert (file["conversations"], file["clock_offset"], file["burst_serial"]) == ([], 0, 0)
    await asyncio.sleep(0.7)  # the save that was pending must not bring anything back
    assert saved(path)["conversations"] == []
    await sim.close()
    again = await start(path)
    assert (await get(again, "/_sim/conversations"))["conversations"] == []
    assert (await get(again, "/_sim/clock"))["offset"] == 0


async def test_without_a_state_file_nothing_is_persisted(start, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sim = await start(None)
    assert PERSISTER not in sim.server.app
    await customer_says(sim)
    await sim.close()
    assert list(tmp_path.iterdir()) == []


def test_state_file_flag_and_env(monkeypatch):
    base = ["serve", "--access-token", "t", "--phone-number-id", "1", "--app-secret", "s"]
    monkeypatch.delenv("SIM_STATE_FILE", raising=False)
    assert cli.settings_from_args(cli.parse_args(base)).state_file is None
    assert cli.settings_from_args(cli.parse_args(base + ["--state-file", "x/s.json"])).state_file == Path("x/s.json")
    monkeypatch.setenv("SIM_STATE_FILE", ".sim-state.json")
    assert cli.settings_from_args(cli.parse_args(base)).state_file == Path(".sim-state.json")
    assert cli.settings_from_args(cli.parse_args(base + ["--state-file", ""])).state_file is None
    monkeypatch.setenv("SIM_STATE_FILE", "")
    assert cli.settings_from_args(cli.parse_args(base)).state_file is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_a_real_serve_process_saves_on_sigterm_and_loads_on_start(bot, tmp_path):
    path = tmp_path / "sim.json"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIM_", "WHATSAPP_"))}
    env["SIM_STATE_FILE"] = str(path)  # the env default of --state-file
    command = [sys.executable, "-m", "connector.simulator", "serve", "--port", str(port), "--access-token", TOKEN,
               "--phone-number-id", PNID, "--app-secret", SECRET, "--bot-webhook", bot.url, "--statuses", "sent"]

    async def run() -> subprocess.Popen:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                assert process.poll() is None, process.stdout.read().decode()
                try:
                    async with session.get(f"{url}/_sim/health") as resp:
                        if resp.status == 200:
                            return process
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "simulator did not start"
                await asyncio.sleep(0.05)

    def stop(process: subprocess.Popen) -> str:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=10)
        return out.decode()

    process = await run()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/_sim/customers/{CUSTOMER}/messages", json={"text": "hi"}) as resp:
                wamid = (await resp.json())["wamid"]
            async with session.post(f"{url}/v23.0/{PNID}/messages", json=text("hello"),
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200
            await bot.wait_for(lambda: len(bot.statuses()) == 1)
            async with session.post(f"{url}/_sim/clock", json={"advance": 7200}) as resp:
                offset = (await resp.json())["offset"]
            async with session.get(f"{url}/_sim/conversations/{CUSTOMER}") as resp:
                before = await resp.json()
    finally:
        stop(process)
    assert [c["wa_id"] for c in saved(path)["conversations"]] == [CUSTOMER]

    process = await run()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/_sim/conversations/{CUSTOMER}") as resp:
                assert await resp.json() == before
            async with session.get(f"{url}/_sim/clock") as resp:
                assert (await resp.json())["offset"] == offset
            read = {"messaging_product": "whatsapp", "status": "read", "message_id": wamid}
            async with session.post(f"{url}/v23.0/{PNID}/messages", json=read,
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert (resp.status, await resp.json()) == (200, {"success": True})
    finally:
        out = stop(process)
    assert str(path) in out  # the log names the state file it loaded
