"""Round-trip latency of one customer message: signed webhook in → Rasa → reply at the simulator,
against a baseline measured in the same run: the same text through Rasa's REST channel on the
same server (no WhatsApp parsing, signing, queueing or Cloud API call).

    .venv/bin/python bench/roundtrip.py [turns]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.stack import ROOT, Stack, http  # noqa: E402


def main(turns: int) -> None:
    credentials = Path(tempfile.mkdtemp()) / "credentials.yml"
    credentials.write_text((ROOT / "credentials.yml").read_text() + "\nrest:\n")
    stack = Stack(Path(tempfile.mkdtemp()), credentials=credentials).start()
    try:
        for n in range(3):  # warm up both paths
            stack.customer_says(f"49100000{n:04d}", "hi")
            stack.wait_outbound(f"49100000{n:04d}", 1)
            http("POST", f"{stack.rasa_url}/webhooks/rest/webhook", {"sender": f"warm{n}", "message": "hi"})

        whatsapp, rest = [], []
        for n in range(turns):
            wa_id = f"49200000{n:04d}"
            started = time.perf_counter()
            stack.customer_says(wa_id, "hi")
            stack.wait_outbound(wa_id, 1)
            whatsapp.append(time.perf_counter() - started)

            started = time.perf_counter()
            status, replies = http("POST", f"{stack.rasa_url}/webhooks/rest/webhook", {"sender": f"rest{n}", "message": "hi"})
            assert status == 200 and replies, replies
            rest.append(time.perf_counter() - started)
    finally:
        stack.stop()

    def line(name, samples):
        ms = sorted(s * 1000 for s in samples)
        return f"{name:<34} median {statistics.median(ms):6.1f} ms   p90 {ms[int(len(ms) * 0.9) - 1]:6.1f} ms"

    print(f"{turns} turns of 'hi' (greeting with 3 reply buttons), one process each, 2 cores")
    print(line("WhatsApp webhook → simulator", whatsapp))
    print(line("baseline: Rasa REST channel", rest))
    print(f"ratio (median WhatsApp / REST)     {statistics.median(whatsapp) / statistics.median(rest):.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
