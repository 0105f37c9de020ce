"""Does a slow database hold up other customers' webhook acknowledgements? Ack latency of signed
webhooks while the care-window store is slow, against a baseline measured in the same run: the
same load with the store at its normal speed.

    .venv/bin/python bench/slow_store_ack.py [webhooks] [rate]      (defaults: 300 at 50/s)

What runs, all in this one process:

- the real channel (`WhatsAppInput.from_credentials`) registered on a Sanic app with Rasa's own
  `register`, served for real on a free 127.0.0.1 port, on the MAIN event loop. The care-window
  state is opened by the channel's own `after_server_start` listener, on a real
  `SQLTrackerStore` (a SQLite file), so its backend is the `SqlBackend`;
- a stand-in agent: `handle_message` does what a turn does cheaply, one
  `send_response(sender_id, {"text": "ok"})`, i.e. the channel's whole outbound path (window
  read, record, send to the Cloud API, wamid stored);
- on a SECOND thread with its own event loop (so a blocked server loop cannot hide itself by
  also stalling the load): the Cloud API simulator (the API the replies go to) and the load.
  20 simulated customers write through the simulator's control API first (so every reply is
  inside their window in the simulator too); the signed webhooks it produced are captured and
  then re-posted, byte for byte with the simulator's X-Hub-Signature-256, at a fixed open-loop
  rate, each POST timed until its 200.

Three runs, each with a fresh server, channel, SQLite file and simulator:

  normal store        the SqlBackend as is (behind a pass-through proxy that counts calls)
  slow store          every state call sleeps 200 ms (`time.sleep`, in the thread it runs in)
                      before reaching the database: what a slow PostgreSQL (a transaction
                      holding a lock) looks like to the channel
  control: ON loop    the same slow store, with `CareState.run` patched to call the backend
                      directly on the event loop: shows the benchmark does see a blocked loop.
                      40 webhooks only: every ack waits behind the blocking calls already queued
                      on the loop, 4 calls of 200 ms a turn, so 40 turns take about 32 s. Once
                      the last ack is in, the sleep is switched off so what is left drains.

How to read the table:

  ack p50 / p99   from each webhook's SCHEDULED send time to its 200 (open loop: a stalled
                  server delays the requests queued behind it, and that delay counts).
                  Nearest-rank percentiles.
  vs normal       the run's ack p50 (p99) / the normal run's ack p50 (p99). Since the intake
                  keeps each message in the inbox before the 200 (README, "Delivery
                  guarantees"), an ack waits for exactly one state write: with the slow store
                  expect about 200 ms, not 1x, and 503s once the slow turns fill max_in_flight.
                  What must not happen is the control's picture: acks held up by the loop.
  loop stall      longest event-loop stall on the server's loop during the run: a watchdog task
                  sleeps 10 ms in a loop and records the largest overshoot. A blocking call on
                  the loop shows up here as its own duration.
  store calls     state calls the channel made, and (in brackets) how many ran ON the event
                  loop's thread; "every store call runs off the loop" means 0.
  replies         replies the simulator accepted / webhooks, and when the last one arrived
                  (seconds after the first webhook was scheduled). With the slow store the
                  replies are late (8 worker threads, 200 ms a call); "not all" when some
                  webhooks were refused with 503 (Meta would deliver them again).
  GC pause        the longest garbage collection during the run (gc.callbacks): a full
                  collection of a Rasa process's heap stalls both loops for tens of ms, and
                  explains a stall that is not the store's. A warm-up run (not shown) takes
                  the first-use costs first, and each run starts after a gc.collect().
  send lag        the load generator's own worst lateness against its schedule (its loop
                  shares the GIL with the server): if it is large, the rate was not held.

Only the channel's state store is made slow. The stand-in agent does not load or save Rasa's
tracker (Rasa's own SQLTrackerStore does that on the loop in a real turn), and with every
window open the channel reads nothing from the tracker store.
"""

import asyncio
import gc
import logging
import math
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

for _key, _value in (("SQLALCHEMY_SILENCE_UBER_WARNING", "1"), ("RASA_TELEMETRY_ENABLED", "false"),
                     ("TF_CPP_MIN_LOG_LEVEL", "2")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from sanic import Sanic  # noqa: E402

from rasa.core.channels.channel import register  # noqa: E402
from rasa.core.lock_store import InMemoryLockStore  # noqa: E402
from rasa.core.tracker_store import SQLTrackerStore  # noqa: E402
from rasa.shared.core.domain import Domain  # noqa: E402

from connector.channel import WhatsAppInput  # noqa: E402
from connector.simulator import Settings, create_app  # noqa: E402
from connector.simulator.core import SIM  # noqa: E402

warnings.filterwarnings("ignore", module="rasa.core.tracker_store")  # SQLAlchemy's URL() deprecation

T = TypeVar("T")

TOKEN = "bench-token"
PNID = "106540352242922"
SECRET = "bench-app-secret"
CUSTOMERS = [f"4915100000{n:03d}" for n in range(20)]
SLOW_SECONDS = 0.2
WATCHDOG_TICK = 0.010
CONTROL_WEBHOOKS = 40
REPLY_DEADLINE = 90.0
WEBHOOK_PATH = "/webhooks/whatsapp/webhook"


# --- the slow store ----------------------------------------------------------------------------

class SlowBackend:
    """Stands in for the channel's `CareStateBackend`: each call sleeps `delay` seconds in the
    thread that runs it, then goes to the real backend. Counts calls, and those made on the
    event loop's thread."""

    def __init__(self, inner: Any, delay: float, loop_thread: int) -> None:
        self._inner = inner
        self.delay = delay
        self.loop_thread = loop_thread
        self.calls = 0
        self.on_loop = 0
        self._count = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._count:
                self.calls += 1
                self.on_loop += threading.get_ident() == self.loop_thread
            if self.delay:
                time.sleep(self.delay)
            return attribute(*args, **kwargs)

        return call


# --- the server side (main loop) ---------------------------------------------------------------

class StandInAgent:
    """What Rasa's Agent offers the channel; a turn is one reply."""

    def __init__(self, tracker_store: SQLTrackerStore) -> None:
        self.tracker_store = tracker_store
        self.lock_store = InMemoryLockStore()
        self.turns = 0

    async def handle_message(self, message: Any) -> None:
        self.turns += 1
        await message.output_channel.send_response(message.sender_id, {"text": "ok"})


class Watchdog:
    """Sleeps `tick` seconds in a loop; the largest overshoot is the longest loop stall."""

    def __init__(self, tick: float = WATCHDOG_TICK) -> None:
        self.tick = tick
        self.longest = 0.0
        self._task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.tick)
            self.longest = max(self.longest, time.perf_counter() - started - self.tick)

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        return self.longest


class GcPauses:
    """The longest garbage collection while active (a full collection of Rasa's heap is one
    stall of the whole process, both loops included)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started = 0.0
        self.active = False
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self.active:
            self.longest = max(self.longest, time.perf_counter() - self._started)


class Server:
    """The channel on a real Sanic server, started and stopped through its own listeners."""

    def __init__(self, sim_url: str, directory: Path) -> None:
        self.channel = WhatsAppInput.from_credentials({
            "access_token": TOKEN, "phone_number_id": PNID, "app_secret": SECRET,
            "verify_token": "bench-verify", "api_url": sim_url, "mark_read": False,
        })
        self.app = Sanic(f"bench_slow_store_{uuid.uuid4().hex[:8]}", configure_logging=False)
        self.app.ctx.agent = StandInAgent(
            SQLTrackerStore(Domain.empty(), dialect="sqlite", db=str(directory / f"{uuid.uuid4().hex[:8]}.db")))
        register([self.channel], self.app, route="/webhooks/")
        self._server: Any = None
        self.url = ""

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}{WEBHOOK_PATH}"
        # Sanic 21.12: listening once this returns; listeners then run as `sanic.run` would
        self._server = await self.app.create_server(sock=sock, return_asyncio_server=True, access_log=False)
        await self._server.startup()
        await self._server.before_start()
        await self._server.after_start()  # the channel opens its care-window state here
        assert self.channel.state is not None, "the channel's state did not open"

    async def stop(self) -> None:
        await self._server.before_stop()  # the channel drains its turns
        self._server.close()
        await self._server.wait_closed()
        await self._server.after_stop()


# --- the world: simulator and load, on their own thread and loop -------------------------------

class World:
    """A second event loop on its own thread: what is outside the Rasa process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="world", daemon=True)
        self._thread.start()

    def run(self, coroutine: Awaitable[T]) -> "asyncio.Future[T]":
        """Awaitable from the main loop without blocking it."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


async def _serve(app: web.Application) -> Tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@dataclass
class Ack:
    scheduled: float
    sent: float
    answered: float
    status: int


@dataclass
class Simulated:
    """Runs on the world loop: the simulator, a sink for the webhooks it writes, the load."""

    runners: List[web.AppRunner] = field(default_factory=list)
    captured: List[Tuple[bytes, str]] = field(default_factory=list)
    url: str = ""
    app: Optional[web.Application] = None

    async def start(self) -> str:
        async def sink(request: web.Request) -> web.Response:
            self.captured.append((await request.read(), request.headers["X-Hub-Signature-256"]))
            return web.Response(text="EVENT_RECEIVED")

        sink_app = web.Application()
        sink_app.router.add_post(WEBHOOK_PATH, sink)
        runner, sink_url = await _serve(sink_app)
        self.runners.append(runner)
        self.app = create_app(Settings(access_token=TOKEN, phone_number_id=PNID, app_secret=SECRET,
                                       bot_webhook_url=sink_url + WEBHOOK_PATH, statuses=()))
        runner, self.url = await _serve(self.app)
        self.runners.append(runner)
        return self.url

    async def customers_write(self, count: int) -> List[Tuple[bytes, str]]:
        """`count` messages from the customers in turn, each one signed webhook the simulator made."""
        self.captured.clear()
        async with aiohttp.ClientSession() as http:
            for n in range(count):
                wa_id = CUSTOMERS[n % len(CUSTOMERS)]
                spec = {"text": f"Where is my parcel? (message {n})"}
                async with http.post(f"{self.url}/_sim/customers/{wa_id}/messages", json=spec) as answer:
                    assert answer.status == 200, await answer.text()
        assert len(self.captured) == count
        return list(self.captured)

    async def fire(self, url: str, webhooks: List[Tuple[bytes, str]], rate: float) -> Tuple[float, List[Ack]]:
        """Post each webhook at its slot of a fixed schedule, without waiting for earlier answers."""
        acks: List[Ack] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
            async def post(body: bytes, signature: str, scheduled: float) -> None:
                sent = time.perf_counter()
                headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signature}
                async with http.post(url, data=body, headers=headers) as answer:
                    await answer.read()
                    acks.append(Ack(scheduled, sent, time.perf_counter(), answer.status))

            start = time.perf_counter() + 0.1
            posts = []
            for n, (body, signature) in enumerate(webhooks):
                scheduled = start + n / rate
                await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                posts.append(asyncio.create_task(post(body, signature, scheduled)))
            await asyncio.gather(*posts)
        return start, acks

    def accepted(self) -> int:
        assert self.app is not None
        return self.app[SIM].state.stats.accepted

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


# --- one run -----------------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    webhooks: int
    acks_ok: int
    p50: float
    p99: float
    stall: float
    gc: float
    calls: int
    calls_on_loop: int
    replies: int
    last_reply: Optional[float]
    send_lag: float
    duration: float


gc_pauses = GcPauses()


def percentile(samples: List[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def one_run(world: World, directory: Path, name: str, webhooks: int, rate: float,
                  delay: float, on_loop: bool) -> Result:
    began = time.perf_counter()
    simulated = Simulated()
    sim_url = await world.run(simulated.start())
    bodies = await world.run(simulated.customers_write(webhooks))
    server = Server(sim_url, directory)
    await server.start()
    state = server.channel.state
    backend = SlowBackend(state.backend, delay, threading.get_ident())
    state.backend = backend
    if on_loop:
        async def run_on_the_loop(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
            return function(*args, **kwargs)

        state.run = run_on_the_loop  # the blocking call the channel must never make

    gc.collect()  # every run starts from the same heap state, none inherits a due full collection
    watchdog = Watchdog()
    watchdog.start()
    gc_pauses.longest, gc_pauses.active = 0.0, True
    start, acks = await world.run(simulated.fire(server.url, bodies, rate))
    if on_loop:
        backend.delay = 0.0  # the control's backlog drains quickly (the slow run keeps its 200 ms)
    last_reply: Optional[float] = None
    deadline = time.perf_counter() + REPLY_DEADLINE
    while time.perf_counter() < deadline:
        if simulated.accepted() >= webhooks:
            last_reply = time.perf_counter() - start
            break
        await asyncio.sleep(0.02)
    stall = await watchdog.stop()
    gc_pauses.active = False
    replies = simulated.accepted()
    await server.stop()
    await world.run(simulated.stop())

    latencies = [(a.answered - a.scheduled) * 1000 for a in acks]
    return Result(
        name=name, webhooks=webhooks, acks_ok=sum(a.status == 200 for a in acks),
        p50=percentile(latencies, 0.50), p99=percentile(latencies, 0.99), stall=stall * 1000, gc=gc_pauses.longest * 1000,
        calls=backend.calls, calls_on_loop=backend.on_loop, replies=replies, last_reply=last_reply,
        send_lag=max((a.sent - a.scheduled) * 1000 for a in acks), duration=time.perf_counter() - began,
    )


def table(results: List[Result], rate: float) -> str:
    normal = results[0]
    head = (f"{'run':<34} {'acks 200':>9} {'ack p50':>9} {'ack p99':>9} {'p50 vs':>7} {'p99 vs':>7} "
            f"{'loop stall':>10} {'GC pause':>9} {'store calls':>12} {'replies':>9} {'last reply':>10} {'send lag':>9}")
    lines = [head, f"{'':<34} {'':>9} {'':>9} {'':>9} {'normal':>7} {'normal':>7} {'(max)':>10} {'(max)':>9} "
                   f"{'(on loop)':>12} {'':>9} {'':>10} {'(max)':>9}"]
    for r in results:
        last = f"{r.last_reply:.1f} s" if r.last_reply is not None else "not all"
        lines.append(
            f"{r.name:<34} {f'{r.acks_ok}/{r.webhooks}':>9} {r.p50:>6.1f} ms {r.p99:>6.1f} ms "
            f"{r.p50 / normal.p50:>6.1f}x {r.p99 / normal.p99:>6.1f}x {r.stall:>7.0f} ms {r.gc:>6.0f} ms "
            f"{f'{r.calls} ({r.calls_on_loop})':>12} {f'{r.replies}/{r.webhooks}':>9} {last:>10} {r.send_lag:>6.1f} ms")
    lines.append(
        f"{len(CUSTOMERS)} customers, webhooks at {rate:g}/s open loop, one text message each; slow = "
        f"{SLOW_SECONDS * 1000:.0f} ms time.sleep per care-state call; CareState pool 8 threads; "
        f"SQLite SQLTrackerStore; ack timed from the scheduled send; watchdog tick {WATCHDOG_TICK * 1000:.0f} ms")
    return "\n".join(lines)


async def main(webhooks: int, rate: float) -> None:
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("sanic.root", "sanic.error", "sanic.access", "connector", "rasa", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    directory = Path(tempfile.mkdtemp(prefix="slow_store_ack_"))
    world = World()
    results = []
    try:
        await one_run(world, directory, "warm-up", 40, rate, 0.0, False)  # first-use costs, not shown
        print("  warm-up: done", file=sys.stderr, flush=True)
        plan = [
            ("normal store", webhooks, 0.0, False),
            (f"slow store, off loop ({SLOW_SECONDS * 1000:.0f} ms/call)", webhooks, SLOW_SECONDS, False),
            (f"control: slow store ON loop", min(CONTROL_WEBHOOKS, webhooks), SLOW_SECONDS, True),
        ]
        for name, count, delay, on_loop in plan:
            result = await one_run(world, directory, name, count, rate, delay, on_loop)
            print(f"  {name}: done in {result.duration:.1f} s", file=sys.stderr, flush=True)
            results.append(result)
    finally:
        world.close()
    loop = type(asyncio.get_running_loop())
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, event loop {loop.__module__}.{loop.__name__}")
    print(table(results, rate))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300, float(sys.argv[2]) if len(sys.argv) > 2 else 50.0))
