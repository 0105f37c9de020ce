"""Turns per second through nginx in front of one `rasa run`, then two (deploy/: nginx.conf,
endpoints.yml with PostgreSQL and Redis), on this machine. A figure, not a gate: on 2 cores the
instances share the cores with PostgreSQL, Redis, the action server, the simulator and this
client.

    .venv/bin/python bench/scale_out.py [customers] [turns per customer] [rounds]

N customers talk at once, each waiting for its reply before writing again ("hi": the greeting
with 3 reply buttons); signed webhooks from the simulator to nginx, replies at the simulator,
status webhooks flowing back through nginx. The same processes serve both set-ups: nginx is
restarted with one upstream or two, on the same port; rounds alternate 1, 2, 1, 2, ... so a
drift in the machine's load hits both. Needs nginx, PostgreSQL and Redis (as the tests).
Prints a table and appends it to bench/RESULTS.md.
"""

import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import append, load  # noqa: E402
from tests.stack import new_wa_id  # noqa: E402
from tests.test_scale_out import NGINX_MISSING, DeployedStack, Nginx, nginx_binary  # noqa: E402

A, B = 0, 1


def customer(stack: DeployedStack, turns: int, start: threading.Barrier) -> list:
    wa_id = new_wa_id()
    latencies = []
    start.wait()
    for n in range(1, turns + 1):
        started = time.perf_counter()
        stack.customer_says(wa_id, "hi")
        stack.wait_outbound(wa_id, n, timeout=120)
        latencies.append(time.perf_counter() - started)
    return latencies


def phase(stack: DeployedStack, customers: int, turns: int) -> dict:
    before = [stack.inbound(A), stack.inbound(B)]
    start = threading.Barrier(customers + 1)
    with ThreadPoolExecutor(max_workers=customers) as pool:
        futures = [pool.submit(customer, stack, turns, start) for _ in range(customers)]
        start.wait()
        began = time.perf_counter()
        latencies = [s for f in futures for s in f.result()]
        took = time.perf_counter() - began
    after = [stack.inbound(A), stack.inbound(B)]
    ms = sorted(s * 1000 for s in latencies)
    return {"turns": len(ms), "seconds": took, "rate": len(ms) / took, "p50": statistics.median(ms),
            "p95": ms[max(0, int(len(ms) * 0.95) - 1)], "split": [int(a - b) for a, b in zip(after, before)]}


def use(stack: DeployedStack, instances: int) -> None:
    """nginx in front of the first `instances` instances, on the port the simulator posts to."""
    stack.nginx.stop()
    stack.nginx = Nginx(stack.nginx.dir, stack.rasa_ports[:instances], port=stack.nginx.port).start()


def main(customers: int, turns: int, rounds: int) -> None:
    if nginx_binary() is None:
        sys.exit(NGINX_MISSING)
    stack = DeployedStack(Path(tempfile.mkdtemp(prefix="scale-out-")))
    results = {1: [], 2: []}
    try:
        stack.start()
        phase(stack, customers, 3)  # a process's first turns are slow: warm both up, with the whole load
        for _ in range(rounds):
            for instances in (1, 2):
                use(stack, instances)
                results[instances].append(phase(stack, customers, turns))
                print(f"  {instances} instance(s): {results[instances][-1]['rate']:.1f} turns/s", flush=True)
    finally:
        stack.stop()

    lines = [f"{customers} customers at once, each waiting for its reply, {turns} turns each ('hi'), through nginx "
             f"(deploy/nginx.conf); PostgreSQL tracker store, Redis lock store; {load()} at the end",
             f"{'set-up':<24} {'round':>5} {'turns':>6} {'seconds':>8} {'turns/s':>8} {'p50 ms':>8} {'p95 ms':>8}  split A/B"]
    for instances in (1, 2):
        for n, r in enumerate(results[instances], start=1):
            label = "1 instance" if instances == 1 else f"{instances} instances"
            lines.append(f"{label + ' behind nginx':<24} {n:>5} {r['turns']:>6} {r['seconds']:>8.1f} {r['rate']:>8.1f} {r['p50']:>8.0f} {r['p95']:>8.0f}  "
                         f"{r['split'][0]}/{r['split'][1]}")
    one = statistics.median(r["rate"] for r in results[1])
    two = statistics.median(r["rate"] for r in results[2])
    lines.append(f"median turns/s: 1 instance {one:.1f}, 2 instances {two:.1f}; ratio 2/1 = {two / one:.2f}x "
                 f"(absolute figures, this machine)")
    table = "\n".join(lines)
    print(table)
    print(append("scale_out.py", table))


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*(args + [32, 10, 2][len(args):]))
