"""How fast the webhook's 200 comes while Rasa is busy: ack latency in an open-loop load at 50 %
and at 100 % of the saturation rate measured in the same run, with a deliberately slow custom
action in the bot.

    .venv/bin/python bench/webhook_ack.py [seconds per phase]        (default 30)

One `rasa run` (the keyword-classifier bench bot, SQLite), the action server with the order
lookup made slow (ORDER_LOOKUP_SECONDS=0.3, an `asyncio.sleep` in the action), the simulator.
One message in four is "where is order 10042" (the slow action), the others "hi".

  saturation   the baseline: 64 customers at once through the simulator, each waiting for its
               reply before writing again, for 15 s: the turns/s this stack completes. These
               writes also open the 400 customers' windows in the simulator.
  50 % / 100 % signed webhooks (Meta's shape, the app secret's X-Hub-Signature-256) posted
               straight to the channel on a fixed schedule at that share of the saturation
               rate, customers in turn, from a client on its own thread and event loop. Each ack
               is timed from the request's SCHEDULED send time to its 200, so a late send counts
               (open loop). Replies go to the simulator, which reports statuses back as Meta.

How to read the table (absolute figures unless marked as a ratio):

  ack p50/p99   nearest rank, ms. Goals (issue 12): p99 <= 20 ms at 50 %, <= 250 ms at 100 %.
  non-200       503s (the intake full: Meta would deliver those again) and errors
  answered      turns the inbox finished / webhooks acknowledged, once the backlog drained
  loop stall    longest event-loop stall of `rasa run` in the phase (the channel's watchdog)
  send lag      the client's worst lateness against its schedule: large means the rate was not held
  ratio         the phase's ack p99 / the 50 % phase's ack p99
"""

import asyncio
import hashlib
import hmac
import itertools
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bot import model  # noqa: E402
from bench.results import append, load  # noqa: E402
from connector.simulator.delivery import encode  # noqa: E402
from connector.simulator.payloads import change, contact, entry, envelope, messages_value, metadata  # noqa: E402
from tests.stack import APP_SECRET, BUSINESS_ACCOUNT_ID, PHONE_NUMBER_ID, Stack  # noqa: E402

CUSTOMERS = [f"4960{n:07d}" for n in range(400)]
SLOW_SECONDS = 0.3
SATURATION_SECONDS = 15
SATURATION_CUSTOMERS = 64


def text_of(n: int) -> str:
    return "where is order 10042" if n % 4 == 0 else "hi"


def signed_webhook(wa_id: str, n: int) -> bytes:
    message = {"from": wa_id, "id": f"wamid.bench{n:08d}{wa_id}", "timestamp": str(int(time.time())), "type": "text",
               "text": {"body": text_of(n)}}
    value = messages_value(metadata("15550783881", PHONE_NUMBER_ID), [contact(wa_id, "Bench")], [message])
    return encode(envelope([entry(BUSINESS_ACCOUNT_ID, [change(value)])]))


def percentile(ms: List[float], share: float) -> float:
    return ms[max(0, int(len(ms) * share + 0.999999) - 1)]


def saturation(stack: Stack) -> float:
    """Closed loop: turns/s with SATURATION_CUSTOMERS waiting for their replies."""
    ids = itertools.count()
    lock = threading.Lock()
    replies: Dict[str, int] = {}
    done = []
    deadline = time.monotonic() + SATURATION_SECONDS

    def customer() -> None:
        while time.monotonic() < deadline:
            with lock:
                n = next(ids)
                wa_id = CUSTOMERS[n % len(CUSTOMERS)]
            before = replies.get(wa_id, 0)
            stack.customer_says(wa_id, text_of(n))
            got = stack.wait_outbound(wa_id, before + 1, timeout=60)
            with lock:
                replies[wa_id] = len(got)
                if time.monotonic() < deadline:
                    done.append(1)

    with ThreadPoolExecutor(SATURATION_CUSTOMERS) as pool:
        list(pool.map(lambda _: customer(), range(SATURATION_CUSTOMERS)))
    return len(done) / SATURATION_SECONDS


async def open_loop(url: str, rate: float, seconds: float, first: int) -> Dict[str, float]:
    count = int(rate * seconds)
    acks: List[float] = []
    lag = 0.0
    refused = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def post(n: int, due: float) -> None:
            nonlocal lag, refused
            wa_id = CUSTOMERS[n % len(CUSTOMERS)]
            body = signed_webhook(wa_id, first + n)
            signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
            lag = max(lag, time.perf_counter() - due)
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json",
                                                                 "X-Hub-Signature-256": signature}) as answer:
                    await answer.read()
                    status = answer.status
            except aiohttp.ClientError:
                status = 0
            if status == 200:
                acks.append((time.perf_counter() - due) * 1000)
            else:
                refused += 1

        start = time.perf_counter() + 0.1
        tasks = []
        for n in range(count):
            due = start + n / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.ensure_future(post(n, due)))
        await asyncio.gather(*tasks)
    acks.sort()
    return {"sent": count, "acked": len(acks), "refused": refused, "p50": statistics.median(acks),
            "p99": percentile(acks, 0.99), "lag": lag * 1000, "rate": count / seconds}


def drained(stack: Stack, timeout: float = 120) -> Dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        intake = stack.rasa("GET", "/webhooks/whatsapp/intake")
        if intake["in_flight"] == 0 or time.monotonic() > deadline:
            return intake
        time.sleep(0.5)


def main(seconds: float) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="webhook-ack-"))
    stack = Stack(workdir, model=model(), order_lookup_seconds=SLOW_SECONDS, channel_settings={"simulator_clock_url": ""})
    rows = []
    try:
        stack.start()
        for wa_id in CUSTOMERS[:8]:  # first turns are slow
            stack.customer_says(wa_id, "hi")
            stack.wait_outbound(wa_id, 1)
        saturated = saturation(stack)
        print(f"  saturation: {saturated:.1f} turns/s", flush=True)
        drained(stack)
        sent = 0
        for share in (0.5, 1.0):
            since = time.time()
            before = drained(stack)
            result = asyncio.run(open_loop(stack.webhook_url, saturated * share, seconds, sent))
            sent += result["sent"]
            after = drained(stack)
            stall = stack.rasa("GET", f"/webhooks/whatsapp/intake?stall_since={since}")["longest_loop_stall_ms"]
            result.update(share=share, stall=stall, failed=after["failed_turns"] - before["failed_turns"],
                          left=after["in_flight"])
            rows.append(result)
            print(f"  {share:.0%}: ack p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms", flush=True)
    finally:
        stack.stop()

    goals = {0.5: 20.0, 1.0: 250.0}
    base = rows[0]["p99"]
    lines = [f"open-loop signed webhooks, 1 in 4 reaching a custom action that takes {SLOW_SECONDS:.1f} s; "
             f"{seconds:.0f} s a phase; saturation (closed loop, {SATURATION_CUSTOMERS} customers): "
             f"{saturated:.1f} turns/s; {load()} at the end",
             f"{'load':<14} {'rate/s':>7} {'sent':>6} {'p50 ms':>7} {'p99 ms':>7} {'goal':>6} {'met':>4} "
             f"{'non-200':>8} {'answered':>10} {'loop stall':>10} {'send lag':>8} {'p99 ratio':>9}"]
    for r in rows:
        answered = f"{r['acked'] - r['left'] - r['failed']}/{r['acked']}"
        lines.append(f"{r['share']:.0%} of sat.{'':<5} {r['rate']:>7.1f} {r['sent']:>6} {r['p50']:>7.1f} {r['p99']:>7.1f} "
                     f"{goals[r['share']]:>6.0f} {'yes' if r['p99'] <= goals[r['share']] else 'no':>4} {r['refused']:>8} "
                     f"{answered:>10} {r['stall']:>8.0f}ms {r['lag']:>6.0f}ms {r['p99'] / base:>8.2f}x")
    table = "\n".join(lines)
    print(table)
    print(append("webhook_ack.py", table))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 30)
