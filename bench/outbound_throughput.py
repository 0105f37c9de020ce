"""Outbound throughput: bot messages per second from ONE process to the Cloud API simulator,
through the channel's real outbound path, against the simulator's own ceiling measured in the
same run.

    .venv/bin/python bench/outbound_throughput.py [--customers 1000] [--messages 3] [--rounds 3]
                                                  [--paced-seconds 20] [--only NAME] [--no-append]

What runs:

- the simulator (`connector.simulator.create_app`) in a SUBPROCESS of its own (its own core on a
  2-core machine, its own GIL), served by aiohttp without an access log, status webhooks and
  redeliveries off unless a run turns them on;
- in this process: the real channel (`WhatsAppInput.from_credentials`) registered on a Sanic app
  with Rasa's own `register`, served on 127.0.0.1, its care-window state opened by the channel's
  own `after_server_start` listener on a real `SQLTrackerStore` (a SQLite file, as the default
  run has), so the backend is the `SqlBackend` with Rasa's engine (as in bench/slow_store_ack.py).
  A stand-in agent takes the customers' first messages (a turn that says nothing).
- `--customers` customers write first, through the simulator (`/_sim/burst`: one signed webhook
  each into the channel's inbox, so their window is open on both sides). Then each run sends
  `--messages` bot messages to every customer, all customers at once, each customer's messages
  one after the other (as a turn sends them): 1,000 x 3 = 3,000 messages by default.

The runs (the first three are the baseline, the client alone and the channel, interleaved
`--rounds` times; each figure is the median of its rounds):

  simulator ceiling   raw aiohttp POSTs of the same send bodies (the JSON the client sends, with
                      the callback id) from this process, same concurrency, same connection
                      limit (aiohttp's default 100, as the client's session): the most this
                      simulator takes from one Python process on this machine. THE BASELINE.
  client alone        `CloudApiClient.send_message` (pacing off, no state): retries, metrics,
                      envelope, the answer parsed.
  channel             `WhatsAppOutput.send_response(sender_id, {"text": ...})` as a Rasa turn
                      calls it (the turn's message in flight, stable callback ids): render ->
                      decide (the window facts read from SQLite) -> record (an INSERT, one
                      commit) -> send -> decision logged and counted. Pacing off
                      (`messages_per_second: 0`, `customer_interval: 0`). Statuses off.
  channel + statuses  the same while the simulator posts each message's sent, delivered and read
                      status webhooks back to the channel (Meta's usual traffic: 3 webhooks per
                      message, each moving the record forward, `sent` also storing its pricing).
                      msg/s is the sends'; "settled" is when every record reached `read`.
  paced (default)     pacing ON with the defaults (80 msg/s per number, customer bucket 30/6 s),
                      `--paced-workers` customers at a time (a backlog of at most 300 messages,
                      under `max_wait` 10 s: a deeper queue is let through after 10 s by design,
                      README "pacing"), for `--paced-seconds` + 1 s. Rate = messages completed in
                      [start + 1 s, start + 1 s + paced-seconds] / paced-seconds (the first second
                      holds the bucket's burst of 80); the whole-run rate is shown too.

Columns: msg/s absolute; "vs ceiling" = msg/s / the simulator-ceiling msg/s of the same run;
p50/p99 the time of one send (nearest rank); CPU % of this process and of the simulator process
over the run (100 % = one core); loop stall = the longest event-loop stall (10 ms watchdog); on
loop = care-state calls made on the event loop's thread (must be 0).
"""

import argparse
import asyncio
import contextlib
import gc
from collections import Counter
import json
import logging
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

for _key, _value in (("SQLALCHEMY_SILENCE_UBER_WARNING", "1"), ("RASA_TELEMETRY_ENABLED", "false"),
                     ("TF_CPP_MIN_LOG_LEVEL", "2")):
    os.environ.setdefault(_key, _value)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import results  # noqa: E402

TOKEN = "bench-token"
PNID = "106540352242922"
SECRET = "bench-app-secret"
WEBHOOK_PATH = "/webhooks/whatsapp/webhook"
WATCHDOG_TICK = 0.010


# --- the simulator, in its own process ----------------------------------------------------------

def simulator_main(port: int, bot_url: str) -> None:
    """`outbound_throughput.py _simulator PORT BOT_URL`: the simulator app, no access log."""
    from aiohttp import web

    from connector.simulator import Settings, create_app

    logging.basicConfig(level=logging.WARNING)
    app = create_app(Settings(access_token=TOKEN, phone_number_id=PNID, app_secret=SECRET, bot_webhook_url=bot_url,
                              statuses=(), redeliver_delays=(), port=port))
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=lambda _: print("ready", flush=True))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SimulatorProcess:
    def __init__(self, bot_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, __file__, "_simulator", str(self.port), bot_url],
            stdout=subprocess.PIPE, stderr=None, text=True, cwd=str(ROOT))
        line = self.process.stdout.readline() if self.process.stdout else ""
        if "ready" not in line:
            raise RuntimeError(f"the simulator did not start: {line!r}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- the channel, on this process's main loop ---------------------------------------------------

class StandInAgent:
    """What Rasa's Agent offers the channel; the customers' first messages say nothing back."""

    def __init__(self, tracker_store: Any) -> None:
        from rasa.core.lock_store import InMemoryLockStore

        self.tracker_store = tracker_store
        self.lock_store = InMemoryLockStore()
        self.turns = 0

    async def handle_message(self, message: Any) -> None:
        self.turns += 1


class StatementCounter:
    """SQL statements and commits on the tracker store's engine (the care state shares it), and
    those run on the event loop's thread (must be 0: every state call runs off the loop)."""

    def __init__(self, engine: Any, loop_thread: int) -> None:
        import sqlalchemy as sa

        self.loop_thread = loop_thread
        self.statements = 0
        self.commits = 0
        self.on_loop = 0
        self.kinds: Dict[str, int] = {}
        self._lock = threading.Lock()
        sa.event.listen(engine, "before_cursor_execute", self._statement)
        sa.event.listen(engine, "commit", self._commit)

    def _statement(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        words = statement.split(None, 3)
        kind = " ".join(words[:3]) if words and words[0] in ("INSERT", "DELETE") else " ".join(words[:2])
        with self._lock:
            self.statements += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if threading.get_ident() == self.loop_thread:
                self.on_loop += 1

    def _commit(self, conn: Any) -> None:
        with self._lock:
            self.commits += 1

    def snapshot(self) -> Tuple[int, int, int]:
        return self.statements, self.commits, self.on_loop


class Server:
    def __init__(self, sim_url: str, port: int, directory: Path) -> None:
        from rasa.core.channels.channel import register
        from rasa.core.tracker_store import SQLTrackerStore
        from rasa.shared.core.domain import Domain
        from sanic import Sanic

        from connector.channel import WhatsAppInput

        self.credentials = {
            "access_token": TOKEN, "phone_number_id": PNID, "app_secret": SECRET, "verify_token": "bench-verify",
            "api_url": sim_url, "mark_read": False,
            "max_in_flight": 5000,  # the customers' first messages arrive all at once (not measured)
        }
        self.channel = WhatsAppInput.from_credentials(
            {**self.credentials, "pacing": {"messages_per_second": 0, "customer_interval": 0}})
        self.app = Sanic(f"bench_outbound_{uuid.uuid4().hex[:8]}", configure_logging=False)
        self.db = directory / "tracker.db"
        self.app.ctx.agent = StandInAgent(SQLTrackerStore(Domain.empty(), dialect="sqlite", db=str(self.db)))
        register([self.channel], self.app, route="/webhooks/")
        self.port = port
        self.url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
        self._server: Any = None
        self.counter: Optional[StatementCounter] = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._server = await self.app.create_server(sock=sock, return_asyncio_server=True, access_log=False)
        await self._server.startup()
        await self._server.before_start()
        await self._server.after_start()  # the channel opens its care-window state here
        assert self.channel.state is not None, "the channel's state did not open"
        self.counter = StatementCounter(self.app.ctx.agent.tracker_store.engine, threading.get_ident())

    def pacer(self, paced: bool) -> Any:
        """The pacer WhatsAppInput makes from these credentials: default pacing, or off."""
        from connector.config import ChannelConfig
        from connector.pacing import Pacer

        credentials = dict(self.credentials)
        if not paced:
            credentials["pacing"] = {"messages_per_second": 0, "customer_interval": 0}
        pacing = dict(ChannelConfig.from_credentials(credentials).pacing)
        return Pacer(**{**pacing, "customer_burst": int(pacing["customer_burst"])})

    async def stop(self) -> None:
        await self._server.before_stop()
        self._server.close()
        await self._server.wait_closed()
        await self._server.after_stop()


class Watchdog:
    def __init__(self) -> None:
        self.longest = 0.0
        self._task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        self.longest = 0.0
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(WATCHDOG_TICK)
            self.longest = max(self.longest, time.perf_counter() - started - WATCHDOG_TICK)

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.longest


class GcPauses:
    """The longest garbage collection while active: a full collection of a Rasa process's heap
    (TensorFlow and all) stalls the whole process for 100 ms or more."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.total = 0.0
        self._started = 0.0
        self.active = False
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self.active:
            took = time.perf_counter() - self._started
            self.longest = max(self.longest, took)
            self.total += took

    def start(self) -> None:
        self.longest, self.total, self.active = 0.0, 0.0, True

    def stop(self) -> float:
        self.active = False
        return self.longest


gc_pauses = GcPauses()


# --- the runs -----------------------------------------------------------------------------------

@dataclass
class Customer:
    wa_id: str
    timestamp: int


@dataclass
class Result:
    name: str
    messages: int
    seconds: float
    latencies: List[float]
    cpu_self: float
    cpu_sim: float
    stall: float
    on_loop: int = 0
    ok: int = 0
    gc: float = 0.0
    gc_total: float = 0.0
    statements: int = 0
    commits: int = 0
    settled: Optional[float] = None
    rate: Optional[float] = None  # paced: the steady-state rate
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def percentile(samples: List[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def message_text(run: str, customer: int, n: int) -> str:
    return f"Order {customer:05d}-{n} has shipped and arrives tomorrow ({run})."


class Bench:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.directory = directory
        self.customers: List[Customer] = []
        self.watchdog = Watchdog()
        self.runs = 0
        self._session: Any = None
        self._client: Any = None
        bot_port = free_port()
        self.sim = SimulatorProcess(f"http://127.0.0.1:{bot_port}{WEBHOOK_PATH}")
        self.server = Server(self.sim.url, bot_port, directory)

    async def http(self, method: str, path: str, body: Any = None) -> Any:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.request(method, self.sim.url + path, json=body) as answer:
                assert answer.status == 200, await answer.text()
                return await answer.json()

    async def seed(self) -> None:
        """Every customer writes once (so their window is open in the simulator and the channel)."""
        count = self.args.customers
        answer = await self.http("POST", "/_sim/burst", {"count": count, "customers": count, "concurrency": 50})
        bad = {k: v for k, v in answer["first_answers"].items() if k != "200"}
        assert not bad, f"the channel refused some first messages: {bad}"
        intake = self.server.channel.intake
        deadline = time.monotonic() + 120
        while intake.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not intake.in_flight, "the customers' first messages did not finish"
        state = self.server.channel.state
        customers = await state.run(lambda: [state.backend.customer(w) for w in answer["wa_ids"]])
        self.customers = [Customer(c.sender_id, int(c.last_inbound_at)) for c in customers]
        assert all(c.timestamp for c in self.customers)

    # one run: every customer's messages, customers at once (or `workers` at a time)

    async def _run(self, name: str, send: Callable[[int, Customer, int], Awaitable[Any]], messages: int,
                   customers: Optional[List[Customer]] = None, workers: Optional[int] = None,
                   completions: Optional[List[float]] = None) -> Result:
        customers = customers if customers is not None else self.customers
        latencies: List[float] = []
        ok = 0
        counter = self.server.counter
        before = counter.snapshot() if counter else (0, 0, 0)

        async def one(index: int, customer: Customer) -> None:
            nonlocal ok
            for n in range(messages):
                started = time.perf_counter()
                if await send(index, customer, n) is not False:
                    ok += 1
                done = time.perf_counter()
                latencies.append(done - started)
                if completions is not None:
                    completions.append(done)

        queue = list(enumerate(customers))

        async def worker() -> None:
            while queue:
                index, customer = queue.pop(0)
                await one(index, customer)

        if os.environ.get("BENCH_GC_DEBUG"):
            gc.collect()
            types_before = Counter(type(o).__name__ for o in gc.get_objects())
        gc.collect()  # each run starts with nothing due for the collector (what is left is the run's own)
        cpu_self, cpu_sim = _cpu_self(), self.sim.cpu_seconds()
        collections = [g["collections"] for g in gc.get_stats()]
        gc_pauses.start()
        self.watchdog.start()
        started = time.perf_counter()
        if workers is None:
            await asyncio.gather(*(one(i, c) for i, c in queue))
        else:
            await asyncio.gather(*(worker() for _ in range(workers)))
        seconds = time.perf_counter() - started
        stall = await self.watchdog.stop()
        after = counter.snapshot() if counter else (0, 0, 0)
        collections = [g["collections"] - c for g, c in zip(gc.get_stats(), collections)]
        if os.environ.get("BENCH_GC_DEBUG"):
            print(f"  {name}: collections per generation {collections}, tracked objects {len(gc.get_objects())}",
                  file=sys.stderr)
            gc.collect()
            grown = Counter(type(o).__name__ for o in gc.get_objects())
            grown.subtract(types_before)
            print("    grown: " + ", ".join(f"{k} {v}" for k, v in grown.most_common(12)), file=sys.stderr)
        return Result(name=name, messages=len(customers) * messages, seconds=seconds, latencies=latencies,
                      cpu_self=(_cpu_self() - cpu_self) / seconds, cpu_sim=(self.sim.cpu_seconds() - cpu_sim) / seconds,
                      stall=stall, on_loop=after[2] - before[2], ok=ok, gc=gc_pauses.stop(), gc_total=gc_pauses.total,
                      statements=after[0] - before[0], commits=after[1] - before[1],
                      extra={"started": started, "counted": before})

    async def ceiling(self, customers: Optional[List[Customer]] = None, messages: Optional[int] = None) -> Result:
        """Raw aiohttp POSTs of the bodies the client sends, same connection limit as its session."""
        import aiohttp

        from connector.render import render

        run = self._tag()
        url = f"{self.sim.url}/{self.server.channel.config.api_version}/{PNID}/messages"
        if self._session is None:  # kept across rounds, as the channel's client keeps its session
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=aiohttp.ClientTimeout(total=self.server.channel.config.request_timeout))
        session = self._session

        async def send(index: int, customer: Customer, n: int) -> bool:
            part = render({"text": message_text(run, index, n)}).messages[0]
            body = {"messaging_product": "whatsapp", "recipient_type": "individual", **part, "to": customer.wa_id,
                    "biz_opaque_callback_data": uuid.uuid4().hex}
            async with session.post(url, json=body) as answer:
                result = await answer.json(content_type=None)
                return answer.status == 200 and bool(result["messages"][0]["id"])

        return await self._run("simulator ceiling (raw aiohttp POST)", send, messages or self.args.messages, customers)

    async def client_alone(self, customers: Optional[List[Customer]] = None, messages: Optional[int] = None) -> Result:
        from connector.client import CloudApiClient
        from connector.metrics import Metrics
        from connector.pacing import Pacer
        from connector.render import render

        run = self._tag()
        config = self.server.channel.config
        if self._client is None:  # kept across rounds, as the channel's is
            self._client = CloudApiClient(config, pacer=Pacer.disabled(),
                                          retry_budget_seconds=config.retry_budget_seconds, metrics=Metrics())
        client = self._client

        async def send(index: int, customer: Customer, n: int) -> bool:
            part = render({"text": message_text(run, index, n)}).messages[0]
            return bool(await client.send_message(customer.wa_id, part, callback_id=uuid.uuid4().hex))

        return await self._run("client alone (CloudApiClient.send)", send, messages or self.args.messages, customers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._client is not None:
            await self._client.close()

    async def channel(self, name: str = "channel (send_response), statuses off", *, paced: bool = False,
                      customers: Optional[List[Customer]] = None, messages: Optional[int] = None,
                      workers: Optional[int] = None, completions: Optional[List[float]] = None) -> Result:
        from connector.care_state import PendingTurn
        from connector.channel import WhatsAppOutput

        run = self._tag()
        channel = self.server.channel
        channel.client.pacer = self.server.pacer(paced)
        outputs: Dict[int, Any] = {}

        def output(index: int, customer: Customer) -> Any:
            turn = PendingTurn(key=f"wamid.bench-{run}-{index}-{customer.wa_id}", sender_id=customer.wa_id, text="hi",
                               metadata={"whatsapp": {"type": "text"}}, timestamp=customer.timestamp,
                               phone_number_id=PNID, received_at=time.time())
            return WhatsAppOutput(channel, turn)

        async def send(index: int, customer: Customer, n: int) -> None:
            if index not in outputs:
                outputs[index] = output(index, customer)
            await outputs[index].send_response(customer.wa_id, {"text": message_text(run, index, n),
                                                                "utter_action": "utter_order_shipped"})

        accepted = await self._sim_accepted()
        result = await self._run(name, send, messages or self.args.messages, customers, workers, completions)
        result.ok = await self._sim_accepted() - accepted  # what reached the simulator (send_response never raises)
        return result

    async def channel_with_statuses(self) -> Result:
        await self.http("POST", "/_sim/config", {"statuses": "sent,delivered,read"})
        read_before = await self._records("read")
        try:
            result = await self.channel("channel + status webhooks (sent, delivered, read)")
            expected = result.messages
            started = result.extra["started"]
            deadline = time.perf_counter() + 300
            while time.perf_counter() < deadline:
                if await self._records("read") - read_before >= expected:
                    result.settled = time.perf_counter() - started
                    now = self.server.counter.snapshot() if self.server.counter else (0, 0, 0)
                    counted = result.extra["counted"]
                    result.statements, result.commits = now[0] - counted[0], now[1] - counted[1]
                    result.on_loop = now[2] - counted[2]
                    break
                await asyncio.sleep(0.25)
            result.extra["read"] = await self._records("read") - read_before
        finally:
            await self.http("POST", "/_sim/config", {"statuses": ""})
        return result

    async def paced(self) -> Result:
        seconds = self.args.paced_seconds
        burst = 80
        total = int(80 * (seconds + 2.5)) + burst
        per_customer = self.args.messages
        needed = math.ceil(total / per_customer)
        customers = [self.customers[i % len(self.customers)] for i in range(needed)]
        completions: List[float] = []
        result = await self.channel("channel, pacing ON (default 80 msg/s)", paced=True, customers=customers,
                                    workers=self.args.paced_workers, completions=completions)
        started = result.extra["started"]
        window = [t for t in completions if started + 1.0 <= t < started + 1.0 + seconds]
        result.rate = len(window) / seconds
        result.extra["whole"] = len(completions) / (max(completions) - started)
        result.extra["window"] = len(window)
        return result

    async def _records(self, status: str) -> int:
        import sqlalchemy as sa

        engine = self.server.app.ctx.agent.tracker_store.engine

        def count() -> int:
            with engine.connect() as connection:
                return int(connection.execute(sa.text("SELECT count(*) FROM whatsapp_outbound WHERE status = :s"),
                                              {"s": status}).scalar())

        return await asyncio.get_running_loop().run_in_executor(None, count)

    async def _sim_accepted(self) -> int:
        return int((await self.http("GET", "/_sim/stats"))["accepted"])

    def _tag(self) -> str:
        self.runs += 1
        return f"r{self.runs}"


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the table and RESULTS.md -------------------------------------------------------------------

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def median_result(results: List[Result]) -> Result:
    """The round with the median msg/s (its other figures with it)."""
    ordered = sorted(results, key=lambda r: r.per_second)
    return ordered[len(ordered) // 2]


def table(rows: List[Tuple[Result, List[Result]]], ceiling: Optional[Result], args: argparse.Namespace,
          context: Dict[str, str]) -> str:
    head = (f"{'run':<50} {'msg/s':>7} {'vs ceiling':>10} {'rounds msg/s':>20} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'CPU self':>8} {'CPU sim':>8} {'SQL/msg':>7} {'commit/msg':>10} {'stall ms':>8} {'GC max/all':>10} "
            f"{'on loop':>7} {'ok':>11}")
    lines = [head]
    for result, rounds in rows:
        vs = f"{result.per_second / ceiling.per_second:.2f}x" if ceiling and result is not ceiling else (
            "baseline" if result is ceiling else "")
        spread = "/".join(f"{r.per_second:.0f}" for r in rounds)
        lines.append(
            f"{result.name:<50} {result.per_second:>7.0f} {vs:>10} {spread:>20} {percentile(result.latencies, .5) * 1000:>7.1f} "
            f"{percentile(result.latencies, .99) * 1000:>7.1f} {result.cpu_self * 100:>7.0f}% {result.cpu_sim * 100:>7.0f}% "
            f"{result.statements / result.messages:>7.2f} {result.commits / result.messages:>10.3f} "
            f"{result.stall * 1000:>8.0f} {f'{result.gc * 1000:.0f}/{result.gc_total * 1000:.0f}':>10} {result.on_loop:>7} {f'{result.ok}/{result.messages}':>11}")
        if result.settled is not None or "read" in result.extra:
            settled = f"{result.settled:.1f} s" if result.settled is not None else "NOT within 300 s"
            lines.append(f"{'':<4}every record at `read` {settled} after the first send: "
                         f"{result.messages / result.settled:.0f} msg/s settled (absolute); "
                         f"{result.extra.get('read')} records read" if result.settled else
                         f"{'':<4}records at `read`: {result.extra.get('read')}/{result.messages} {settled}")
        if result.rate is not None:
            within = abs(result.rate - 80) / 80
            lines.append(f"{'':<4}steady rate {result.rate:.2f} msg/s over {args.paced_seconds:g} s after the first "
                         f"second ({result.extra['window']} messages): {within * 100:.1f} % from 80 "
                         f"({'within' if within <= 0.05 else 'NOT within'} 5 %); whole run incl. the 1-s burst of 80: "
                         f"{result.extra['whole']:.1f} msg/s (absolute)")
    lines.append(
        f"{args.customers} customers x {args.messages} text messages, all customers at once, each customer's messages "
        f"in turn; msg/s absolute (median of {args.rounds} rounds, the rounds beside it), vs ceiling = / the raw-POST "
        f"msg/s of the same round set; simulator in its own process; SQLite SQLTrackerStore (file in {context['tmp']}); "
        f"CPU 100 % = one core ({cpu_model()}); before: {context['load_before']}; after: {context['load_after']}")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------

async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("sanic.root", "sanic.error", "sanic.access", "rasa", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    directory = Path(tempfile.mkdtemp(prefix="outbound_throughput_"))
    # `rasa run` logs at INFO by default: each decision's JSON line is written, here to a file
    decisions = logging.getLogger("connector.decisions")
    decisions.setLevel(logging.INFO)
    decisions.propagate = False
    handler = logging.FileHandler(directory / "decisions.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)-5s]  %(name)s  - %(message)s"))
    decisions.addHandler(handler)
    context = {"tmp": str(directory), "load_before": results.load()}
    bench = Bench(args, directory)
    rows: List[Tuple[Result, List[Result]]] = []
    ceiling: Optional[Result] = None
    try:
        await bench.server.start()
        t = time.perf_counter()
        await bench.seed()
        print(f"  {len(bench.customers)} customers wrote in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        if args.gc_freeze:  # what a process could do once Rasa has loaded everything (see --gc-freeze)
            gc.collect()
            gc.freeze()
        warm = bench.customers[:100]
        await bench.ceiling(warm, 2)
        await bench.client_alone(warm, 2)
        await bench.channel(customers=warm, messages=2)
        only = set(args.only or ())
        if args.profile:
            await profiled(args, bench)
            return
        plan = [("ceiling", bench.ceiling), ("client", bench.client_alone), ("channel", bench.channel)]
        plan = [(key, run) for key, run in plan if not only or key in only or key == "ceiling"]
        rounds: Dict[str, List[Result]] = {key: [] for key, _ in plan}
        for n in range(args.rounds):
            for key, run in plan:
                result = await run()
                rounds[key].append(result)
                print(f"  round {n + 1} {result.name}: {result.per_second:.0f} msg/s", file=sys.stderr, flush=True)
        for key, _ in plan:
            rows.append((median_result(rounds[key]), rounds[key]))
        ceiling = rows[0][0]
        if not only or "statuses" in only:
            result = await bench.channel_with_statuses()
            print(f"  {result.name}: {result.per_second:.0f} msg/s, settled {result.settled}", file=sys.stderr, flush=True)
            rows.append((result, [result]))
        if not only or "paced" in only:
            result = await bench.paced()
            print(f"  {result.name}: steady {result.rate:.2f} msg/s", file=sys.stderr, flush=True)
            rows.append((result, [result]))
        if bench.server.counter is not None:
            kinds = bench.server.counter.kinds
            print("  SQL statements in the whole run: " + ", ".join(
                f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])), file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            await bench.close()
        with contextlib.suppress(Exception):
            await bench.server.stop()
        bench.sim.stop()
    context["load_after"] = results.load()
    text = table(rows, ceiling, args, context)
    print(results.header("outbound_throughput.py"))
    print(text)
    if not args.no_append:
        print(results.append("outbound_throughput.py", text, args.note or ""))


async def profiled(args: argparse.Namespace, bench: Bench) -> None:
    """`--profile FILE`: py-spy (raw, GIL-holding thread only) attached to this process during
    `--rounds` runs of `--profile-run`, nothing else measured or appended."""
    runs = {"ceiling": bench.ceiling, "client": bench.client_alone, "channel": bench.channel,
            "statuses": bench.channel_with_statuses}
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(os.getpid()),
                            "--rate", str(args.profile_rate), "--format", "raw", "--gil", "-o", args.profile],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    await asyncio.sleep(1.5)  # attached
    try:
        for n in range(args.rounds):
            result = await runs[args.profile_run]()
            print(f"  profiled round {n + 1} {result.name}: {result.per_second:.0f} msg/s, GC {result.gc_total * 1000:.0f} ms",
                  file=sys.stderr, flush=True)
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    print(f"  profile in {args.profile}", file=sys.stderr)


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=3, help="bot messages per customer and run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paced-seconds", type=float, default=20.0)
    parser.add_argument("--paced-workers", type=int, default=100, help="customers at a time in the paced run")
    parser.add_argument("--only", action="append", choices=("client", "channel", "statuses", "paced"),
                        help="these runs (and the ceiling) only; repeatable")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to bench/RESULTS.md")
    parser.add_argument("--note", help="a line of text appended under the table in bench/RESULTS.md")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after startup: the startup heap is never scanned by the collector again")
    parser.add_argument("--profile", metavar="FILE", help="py-spy raw profile of --profile-run's rounds only")
    parser.add_argument("--profile-run", default="channel", choices=("ceiling", "client", "channel", "statuses"))
    parser.add_argument("--profile-rate", type=int, default=200)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_simulator":
        simulator_main(int(sys.argv[2]), sys.argv[3])
    else:
        warnings.filterwarnings("ignore", module="rasa.core.tracker_store")
        asyncio.run(main(parse(sys.argv[1:])))
