"""Resident memory of `rasa run` after N distinct customers have written (default 10,000),
against the same process before they wrote: what the channel (and Rasa) keep per customer.

    .venv/bin/python bench/memory.py [customers]

One `rasa run` (the keyword-classifier bench bot, SQLite), the action server, the simulator.
"before" is the process with the model loaded, after a warm-up of 200 customers (first turns
fill caches) and idle. Then the customers write "hi" once each, through the simulator's burst
(signed webhooks, 32 at a time), in four steps; after each step the inbox drains, and RSS (VmRSS
of the process, /proc, the median of 5 samples 0.2 s apart) is read.

How to read the table: RSS in MiB (absolute), the ratio against "before", and the growth per
1,000 customers from the step before: flat means nothing is kept per customer in the process;
a constant growth per step would be a leak.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bot import model  # noqa: E402
from bench.results import append, load  # noqa: E402
from tests.stack import Stack, http  # noqa: E402

STEPS = 4
WARM_UP = 200


def rss_mib(pid: int) -> float:
    samples = []
    for _ in range(5):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                samples.append(int(line.split()[1]) / 1024)
        time.sleep(0.2)
    return statistics.median(samples)


def write(stack: Stack, customers: int) -> float:
    """`customers` new customers write once each; seconds until every turn is done."""
    started = time.monotonic()
    before = stack.stats()["accepted"]
    status, answer = http("POST", f"{stack.sim_url}/_sim/burst", {"count": customers, "concurrency": 32, "text": "hi"},
                          timeout=600)  # answers once every webhook of the burst was acknowledged
    assert status == 200, answer
    assert set(answer["first_answers"]) == {"200"}, answer["first_answers"]
    deadline = time.monotonic() + 600
    while stack.stats()["accepted"] - before < customers or stack.rasa("GET", "/webhooks/whatsapp/intake")["in_flight"]:
        assert time.monotonic() < deadline, "the turns did not finish within 10 minutes"
        time.sleep(0.5)
    return time.monotonic() - started


def main(customers: int) -> None:
    stack = Stack(Path(tempfile.mkdtemp(prefix="memory-")), model=model(), channel_settings={"simulator_clock_url": ""})
    points: List[Tuple[int, float, float]] = []  # (customers so far, RSS MiB, seconds of the step)
    try:
        stack.start()
        pid = stack.processes["rasa"].pid
        write(stack, WARM_UP)
        time.sleep(2)
        points.append((0, rss_mib(pid), 0.0))
        step = customers // STEPS
        for n in range(1, STEPS + 1):
            took = write(stack, step)
            time.sleep(2)
            points.append((n * step, rss_mib(pid), took))
            print(f"  {n * step:>6} customers: {points[-1][1]:.1f} MiB", flush=True)
        failed = stack.rasa("GET", "/webhooks/whatsapp/intake")["failed_turns"]
    finally:
        stack.stop()

    before = points[0][1]
    lines = [f"RSS of rasa run (keyword-classifier bot, SQLite) as distinct customers write once each; before = model "
             f"loaded + {WARM_UP} warm-up customers, idle; {load()} at the end",
             f"{'customers':>9} {'RSS MiB':>8} {'vs before':>9} {'KiB per 1,000 (step)':>21} {'turns/s (step)':>15}"]
    for (n, rss, took), previous in zip(points, [None] + points[:-1]):
        growth = f"{(rss - previous[1]) * 1024 / ((n - previous[0]) / 1000):.0f}" if previous else "-"
        rate = f"{(n - previous[0]) / took:.1f}" if previous else "-"
        lines.append(f"{n:>9} {rss:>8.1f} {rss / before:>8.2f}x {growth:>21} {rate:>15}")
    total = points[-1]
    lines.append(f"after {total[0]:,} customers: +{total[1] - before:.1f} MiB ({total[1] / before:.2f}x before), "
                 f"{(total[1] - before) * 1024 / (total[0] / 1000):.0f} KiB per 1,000 customers; failed turns {failed}")
    table = "\n".join(lines)
    print(table)
    print(append("memory.py", table))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
