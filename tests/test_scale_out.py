"""The deployment in deploy/: two `rasa run` instances behind Debian's nginx (deploy/nginx.conf,
started as deploy/run.sh starts it), both with deploy/endpoints.yml: one PostgreSQL tracker store
and one Redis lock store (POSTGRES_URL, REDIS_URL). The simulator posts Meta's webhooks to nginx,
which hands them out in turn. Needs nginx (`apt-get install nginx`; .ci/run installs it), and
PostgreSQL and Redis running: these tests fail, they never skip (leave them out with
`-m "not nginx"`)."""

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from connector.signature import sign
from tests.stack import APP_SECRET, ROOT, Stack, free_port, http
from tests.test_e2e import webhook_from

pytestmark = [pytest.mark.e2e, pytest.mark.services, pytest.mark.nginx]

A, B = 0, 1
NGINX_MISSING = ("nginx is not installed: `apt-get install nginx` (Debian's package; .ci/run installs it), "
                 "or leave these tests out with -m \"not nginx\"")


def nginx_binary() -> Optional[str]:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


class Nginx:
    """deploy/run.sh's nginx (`deploy/run.sh nginx`: deploy/nginx.conf with these instances'
    ports, under a directory of its own, in the foreground) on a free loopback port."""

    def __init__(self, workdir: Path, rasa_ports: List[int], port: Optional[int] = None) -> None:
        self.dir = workdir
        self.rasa_ports = list(rasa_ports)
        self.port = port or free_port()
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/webhooks/whatsapp/webhook"

    def env(self) -> Dict[str, str]:
        path = os.environ.get("PATH", "")
        return {**os.environ, "PATH": f"{path}:/usr/sbin:/sbin", "RUN_DIR": str(self.dir),
                "RASA_PORTS": " ".join(map(str, self.rasa_ports)), "NGINX_LISTEN": f"127.0.0.1:{self.port}"}

    def conf(self) -> str:
        return subprocess.run(["bash", str(ROOT / "deploy" / "run.sh"), "conf"], env=self.env(), check=True,
                              capture_output=True, text=True).stdout

    def start(self) -> "Nginx":
        if nginx_binary() is None:
            pytest.fail(NGINX_MISSING, pytrace=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "run.log", "ab") as log:
            self.process = subprocess.Popen(["bash", str(ROOT / "deploy" / "run.sh"), "nginx"], env=self.env(),
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                http("GET", f"{self.url}/", timeout=1)  # any answer (502 before the instances are up)
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx does not answer on {self.url}:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # nginx's fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return "".join((self.dir / name).read_text(errors="replace")[-3000:]
                       for name in ("run.log", "error.log") if (self.dir / name).exists())


class DeployedStack(Stack):
    """Stack's processes with deploy/endpoints.yml (filled in from POSTGRES_URL and REDIS_URL, as
    deploy/run.sh fills it in from POSTGRES_* and REDIS_*) and the simulator posting to nginx."""

    def __init__(self, workdir: Path, instances: int = 2, statuses: Optional[str] = None, **kwargs) -> None:
        """`statuses`: the status webhooks the simulator sends after each bot message (its
        --statuses; default sent, delivered, read)."""
        super().__init__(workdir, instances=instances, shared=True, **kwargs)
        self.nginx = Nginx(workdir / "nginx", self.rasa_ports)
        self.statuses = statuses

    def endpoints(self) -> str:
        return (ROOT / "deploy" / "endpoints.yml").read_text()

    def env(self) -> Dict[str, str]:
        from tests.services import postgres_settings, redis_settings

        pg, redis = postgres_settings(), redis_settings()
        env = super().env()
        env.update(
            SIM_BOT_WEBHOOK_URL=self.nginx.webhook_url,
            SANIC_WORKERS="1",
            ACTION_SERVER_URL=f"http://127.0.0.1:{self.actions_port}/webhook",
            POSTGRES_HOST=pg["host"], POSTGRES_PORT=str(pg["port"]), POSTGRES_DB=pg["db"],
            POSTGRES_USER=pg["username"] or "", POSTGRES_PASSWORD=pg["password"] or "",
            REDIS_HOST=redis["host"], REDIS_PORT=str(redis["port"]), REDIS_DB=str(redis["db"]),
            REDIS_PASSWORD=redis["password"] or "",
        )
        if self.statuses is not None:
            env["SIM_STATUSES"] = self.statuses
        return env

    def start(self) -> "DeployedStack":
        self.nginx.start()
        super().start()
        return self

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.nginx.stop()

    def counters(self, instance: int) -> Dict[str, float]:
        """The instance's own metrics, from its own port: `name{labels}` → value."""
        status, text = http("GET", f"{self.rasa_urls[instance]}/webhooks/whatsapp/metrics?token={self.auth_token}")
        assert status == 200, text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def inbound(self, instance: int) -> float:
        """Customer messages this instance took into the inbox."""
        return sum(v for k, v in self.counters(instance).items() if k.startswith("whatsapp_inbound_messages_total"))

    def duplicates(self, instance: int) -> float:
        return self.counters(instance).get("whatsapp_duplicates_total", 0.0)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    if nginx_binary() is None:
        pytest.fail(NGINX_MISSING, pytrace=False)
    # Two status webhooks per bot message: a customer message and its reply's statuses make three
    # requests, so round robin hands the customer's next message to the other instance. (With
    # Meta's three, sent, delivered and read, it would be four: every message of a customer who
    # waits for each reply would go to the same instance.)
    stack = DeployedStack(tmp_path_factory.mktemp("scale-out"), statuses="sent,delivered")
    try:
        yield stack.start()
    finally:
        stack.stop()


def post_to(stack: Stack, instance: int, body) -> int:
    raw = json.dumps(body).encode()
    return http("POST", f"{stack.rasa_urls[instance]}/webhooks/whatsapp/webhook", raw,
                headers={"X-Hub-Signature-256": sign(raw, APP_SECRET)})[0]


def outbound(stack: Stack, wa_id: str) -> List[dict]:
    return [m for m in stack.conversation(wa_id)["messages"] if m["direction"] == "out"]


def trigger(stack: Stack, wa_id: str, instance: int) -> None:
    stack.rasa("POST", f"/conversations/{wa_id}/trigger_intent?output_channel=whatsapp",
               {"name": "EXTERNAL_order_follow_up"}, instance=instance)


def test_nginx_is_generated_from_deploy_nginx_conf_and_keeps_the_channels_body_limit(deployed):
    conf = (deployed.nginx.dir / "nginx.conf").read_text()
    assert conf == deployed.nginx.conf()
    assert re.findall(r"server 127\.0\.0\.1:(\d+) ", conf) == [str(p) for p in deployed.rasa_ports]
    assert f"listen 127.0.0.1:{deployed.nginx.port};" in conf
    assert "client_max_body_size 1m;" in conf  # the channel's max_body_bytes default: 1 MiB
    # Exactly 1 MiB passes nginx and reaches an instance (which finds it is not JSON: 400, after
    # checking the signature of the bytes nginx forwarded); one byte more is nginx's 413.
    raw = b" " * 1_048_576
    status, answer = http("POST", deployed.nginx.webhook_url, raw, headers={"X-Hub-Signature-256": sign(raw, APP_SECRET)})
    assert (status, answer.startswith("malformed webhook")) == (400, True)
    raw += b" "
    assert http("POST", deployed.nginx.webhook_url, raw, headers={"X-Hub-Signature-256": sign(raw, APP_SECRET)})[0] == 413


def test_one_customer_across_both_instances_one_turn_each_in_order_one_template(deployed, wa_id):
    stack = deployed
    violations_before = stack.stats()["window_violations"]
    messages = ["hi", {"button_reply": {"id": "/opt_in", "title": "Order updates"}}, "where is order 10042",
                "where is order 10043", "where is order 10046", "thanks"]
    handled_by, wamids = [], []
    for n, message in enumerate(messages, start=1):
        before = [stack.inbound(A), stack.inbound(B)]
        statuses = stack.stats()["statuses_sent"]
        wamids.append(stack.customer_says(wa_id, message)["wamid"])  # through nginx
        replies = stack.wait_outbound(wa_id, n)
        deadline = time.monotonic() + 10  # the reply's two statuses, through nginx too
        while stack.stats()["statuses_sent"] < statuses + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = [stack.inbound(A), stack.inbound(B)]
        took = [i for i in (A, B) if after[i] > before[i]]
        assert len(took) == 1 and after[took[0]] == before[took[0]] + 1, (before, after)
        handled_by.append(took[0])
        if isinstance(message, str) and message.startswith("where is order"):
            assert message[-5:] in replies[-1]["text"], replies[-1]
    first = handled_by[0]
    assert handled_by == [first, 1 - first] * (len(messages) // 2), handled_by  # alternately, by round robin

    # Meta delivers a message again: to the instance that did NOT handle it, to the one that did,
    # and through nginx. Each is acknowledged and counted as a duplicate; none is a second turn.
    n = 2  # "where is order 10042"
    record = [m for m in stack.conversation(wa_id)["messages"] if m["direction"] == "in"][n]
    assert record["wamid"] == wamids[n]
    body = webhook_from(wa_id, [{"from": wa_id, "id": wamids[n], "timestamp": str(record["timestamp"]),
                                 "type": "text", "text": {"body": messages[n]}}])
    other = 1 - handled_by[n]
    dup_before = [stack.duplicates(A), stack.duplicates(B)]
    assert post_to(stack, other, body) == 200
    assert post_to(stack, handled_by[n], body) == 200
    assert stack.sim("POST", "webhook", {"body": body})["status"] == 200
    dup_after = [stack.duplicates(A), stack.duplicates(B)]
    assert dup_after[other] >= dup_before[other] + 1 and dup_after[handled_by[n]] >= dup_before[handled_by[n]] + 1
    assert sum(dup_after) == sum(dup_before) + 3
    assert "delivered again: done or being handled" in stack.log(stack._rasa_name(other))

    # Proactive: the follow-up triggered on each instance's own port, inside the window.
    for n, instance in enumerate((A, B), start=1):
        trigger(stack, wa_id, instance)
        assert stack.wait_outbound(wa_id, len(messages) + n)[-1]["text"].startswith("A quick update")

    # The window lapses (+25 h; the reminders the order questions scheduled are due at +30 h):
    # triggers on both instances at once; one template goes out, the others are suppressed.
    stack.sim("POST", "clock", {"advance": 90000})
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda k: trigger(stack, wa_id, k % 2), range(6)))
    time.sleep(1)  # nothing else is on its way
    out = outbound(stack, wa_id)
    after_lapse = out[len(messages) + 2:]
    assert [m["type"] for m in after_lapse] == ["template"], after_lapse
    assert [m["type"] for m in out].count("template") == 1
    for instance in (A, B):
        view = stack.window(wa_id, instance)
        assert view["templates_sent"] == 1 and view["templates_left"] == 0
        kinds = [r["kind"] for r in view["records"]]
        assert kinds.count("template") == 1 and kinds.count("suppressed") == 5, kinds
    assert stack.stats()["window_violations"] == violations_before

    # One turn per customer message (the tracker is the shared one: ask either instance), and
    # 2 + 6 external turns from the triggers.
    events = stack.tracker(wa_id, turns=len(messages) + 8)["events"]
    users = [e for e in events if e["event"] == "user"]
    customer = [e for e in users if not (e.get("parse_data", {}).get("intent", {}).get("name") or "").startswith("EXTERNAL_")]
    assert [e["message_id"] for e in customer] == wamids
    assert len(users) == len(messages) + 8

    # Replies in the order of the customer's messages: each message, then its answer.
    conversation = stack.conversation(wa_id)["messages"][:2 * len(messages)]
    assert [m["direction"] for m in conversation] == ["in", "out"] * len(messages), conversation
    answers = [m["text"] for m in conversation if m["direction"] == "out"]
    assert ["10042" in answers[2], "10043" in answers[3], "10046" in answers[4]] == [True] * 3, answers

    # nginx's log says which instance took each request: both, from the simulator's webhooks.
    access = (stack.nginx.dir / "access.log").read_text()
    for port in stack.rasa_ports:
        assert f"upstream=127.0.0.1:{port} upstream_status=200" in access
