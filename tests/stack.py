"""Starts the real thing as processes: the Cloud API simulator, the action server and `rasa run`
with the WhatsApp channel, wired together on free local ports. Used by the end-to-end tests and
by bench/."""

import hashlib
import hmac
import itertools
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "whatsapp-demo.tar.gz"
BIN = Path(sys.executable).parent

PHONE_NUMBER_ID = "106540352242922"
BUSINESS_ACCOUNT_ID = "102290129340398"  # the simulator's business account: the templates are checked against it
ACCESS_TOKEN = "e2e-access-token"
APP_SECRET = "e2e-app-secret"
VERIFY_TOKEN = "e2e-verify-token"


_numbers = itertools.count(1)
# PostgreSQL and Redis keep earlier runs' customers, and fresh containers repeat PIDs: the run is
# told apart by its start time (10 ms steps, repeating after 11 days).
_RUN = int(time.time() * 100) % 10**8


def new_wa_id() -> str:
    """A customer no other test of this run, nor of an earlier run, has played (15 digits)."""
    number = next(_numbers)
    assert number < 10**5, "new_wa_id: more customers than one run can name"
    return f"49{_RUN:08d}{number:05d}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, body: Any = None, headers: Optional[Dict[str, str]] = None, timeout: float = 30):
    """(status, parsed JSON or text) — plain urllib so the harness shares nothing with the code under test."""
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Stack:
    def __init__(
        self,
        workdir: Path,
        window_errors: str = "async",
        credentials: Path = ROOT / "credentials.yml",
        follow_up_seconds: float = 30 * 3600,
        instances: int = 1,
        shared: bool = False,
        tracker_store: str = "SQL",
        lock_store: str = "connector.lock_store.AtomicRedisLockStore",
        channel_settings: Optional[Dict[str, Any]] = None,
        order_lookup_seconds: float = 0,
        redeliver_delays: Optional[str] = None,
        extra_numbers: tuple = (),
        desk_url: str = "",
        model: Path = MODEL,
    ) -> None:
        """`tracker_store` and `lock_store` are endpoint types (`in_memory` for a lock store each
        process keeps to itself); `channel_settings` override keys of the channel's credentials;
        `order_lookup_seconds` makes the order-status action slow; `redeliver_delays` are the
        simulator's (as its --redeliver-delays); `extra_numbers` are more business numbers the
        bot serves and the simulator knows; `desk_url` receives the handoff events; `model` is the
        trained model `rasa run` serves (the demo's by default)."""
        self.workdir = workdir
        self.model = model
        self.tracker_store = tracker_store
        self.lock_store = lock_store
        self.fault_file = workdir / "store-faults.json"
        if channel_settings:
            import yaml

            block = yaml.safe_load(credentials.read_text())
            block["connector.WhatsAppInput"].update(channel_settings)
            credentials = workdir / "credentials.yml"
            credentials.write_text(yaml.safe_dump(block))
        self.credentials = credentials
        self.follow_up_seconds = follow_up_seconds
        self.order_lookup_seconds = order_lookup_seconds
        self.redeliver_delays = redeliver_delays
        self.extra_numbers = tuple(extra_numbers)
        self.shared = shared
        self.window_errors = window_errors
        self.sim_port, self.actions_port = free_port(), free_port()
        self.rasa_ports = [free_port() for _ in range(instances)]
        self.auth_token = secrets.token_hex(16)  # never starts with "-", which rasa run would read as a flag
        self.agent_token = secrets.token_hex(16)
        self.desk_url = desk_url
        self.processes: Dict[str, subprocess.Popen] = {}
        self.logs: Dict[str, Path] = {}

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def rasa_urls(self) -> List[str]:
        return [f"http://127.0.0.1:{port}" for port in self.rasa_ports]

    @property
    def rasa_url(self) -> str:
        return self.rasa_urls[0]

    @property
    def webhook_url(self) -> str:
        return f"{self.rasa_url}/webhooks/whatsapp/webhook"

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=str(ROOT),
            TF_CPP_MIN_LOG_LEVEL="2",
            SQLALCHEMY_SILENCE_UBER_WARNING="1",
            RASA_TELEMETRY_ENABLED="false",
            WHATSAPP_ACCESS_TOKEN=ACCESS_TOKEN,
            WHATSAPP_PHONE_NUMBER_ID=",".join((PHONE_NUMBER_ID, *self.extra_numbers)),
            WHATSAPP_APP_SECRET=APP_SECRET,
            WHATSAPP_VERIFY_TOKEN=VERIFY_TOKEN,
            WHATSAPP_BUSINESS_ACCOUNT_ID=BUSINESS_ACCOUNT_ID,
            WHATSAPP_API_URL=self.sim_url,
            WHATSAPP_SIMULATOR_CLOCK_URL=self.sim_url,
            SIM_BOT_WEBHOOK_URL=self.webhook_url,
            RASA_AUTH_TOKEN=self.auth_token,
            WHATSAPP_AGENT_TOKEN=self.agent_token,
            WHATSAPP_HANDOFF_WEBHOOK_URL=self.desk_url,
            RASA_URL=self.rasa_url,
            ORDER_FOLLOW_UP_SECONDS=str(self.follow_up_seconds),
            STORE_FAULTS_FILE=str(self.fault_file),
            ORDER_LOOKUP_SECONDS=str(self.order_lookup_seconds),
        )
        return env

    def endpoints(self) -> str:
        """SQLite by default; with `shared=True` the multi-instance set-up: PostgreSQL tracker
        store and Redis lock store (URLs from POSTGRES_URL / REDIS_URL)."""
        text = f'action_endpoint:\n  url: "http://127.0.0.1:{self.actions_port}/webhook"\n'
        if not self.shared:
            return text + f'tracker_store:\n  type: {self.tracker_store}\n  dialect: "sqlite"\n  db: "{self.workdir / "tracker.db"}"\n'
        from tests.services import postgres_settings, redis_settings

        pg, redis = postgres_settings(), redis_settings()
        pg["url"], redis["url"] = pg.pop("host"), redis.pop("host")  # Rasa's endpoint key for the host
        text += f"tracker_store:\n  type: {self.tracker_store}\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in pg.items() if v is not None)
        if self.lock_store == "in_memory":
            return text + "lock_store:\n  type: in_memory\n"
        text += f"lock_store:\n  type: {self.lock_store}\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in redis.items() if v is not None)
        return text

    def start(self) -> "Stack":
        if not self.model.exists():
            raise RuntimeError(f"{self.model} is missing: run `bash scripts/test.sh` (it trains the model)")
        (self.workdir / "endpoints.yml").write_text(self.endpoints())
        self._spawn("simulator", [
            str(BIN / "python"), "-m", "connector.simulator", "serve", "--port", str(self.sim_port),
            "--window-errors", self.window_errors, "--phone-number-id", PHONE_NUMBER_ID,
            *(["--redeliver-delays", self.redeliver_delays] if self.redeliver_delays is not None else []),
            *(["--extra-phone-number-ids", ",".join(self.extra_numbers)] if self.extra_numbers else []),
        ])
        self.start_actions(wait=False)
        for instance in range(len(self.rasa_ports)):
            self.start_rasa(instance, wait=False)
        self._wait_ready("simulator", f"{self.sim_url}/_sim/health")
        self._wait_ready("actions", f"http://127.0.0.1:{self.actions_port}/health")
        for instance in range(len(self.rasa_ports)):
            self._wait_ready(self._rasa_name(instance), f"{self.rasa_urls[instance]}/status?token={self.auth_token}")
        return self

    def start_actions(self, wait: bool = True) -> None:
        self._spawn("actions", [str(BIN / "rasa"), "run", "actions", "--actions", "actions", "--port", str(self.actions_port)])
        if wait:
            self._wait_ready("actions", f"http://127.0.0.1:{self.actions_port}/health")

    def stop_actions(self) -> None:
        process = self.processes.pop("actions")
        process.kill()
        process.wait(timeout=30)

    def terminate_rasa(self, instance: int = 0, timeout: float = 60) -> float:
        """SIGTERM, as an orchestrator stops a container; the seconds until the process exited."""
        process = self.processes.pop(self._rasa_name(instance))
        started = time.monotonic()
        process.terminate()
        process.wait(timeout=timeout)
        return time.monotonic() - started

    def start_rasa(self, instance: int = 0, wait: bool = True) -> None:
        name = self._rasa_name(instance)
        self._spawn(name, [
            str(BIN / "rasa"), "run", "--model", str(self.model), "--port", str(self.rasa_ports[instance]),
            "--credentials", str(self.credentials), "--endpoints", str(self.workdir / "endpoints.yml"),
            "--enable-api", "--auth-token", self.auth_token, "--interface", "127.0.0.1",
            *(["--debug"] if os.environ.get("STACK_DEBUG") else []),
        ])
        if wait:
            self._wait_ready(name, f"{self.rasa_urls[instance]}/status?token={self.auth_token}")

    def kill_rasa(self, instance: int = 0) -> None:
        """kill -9: no shutdown listener runs, nothing is flushed."""
        process = self.processes.pop(self._rasa_name(instance))
        process.kill()
        process.wait(timeout=30)

    def fail_store(self, table: str, count: int = 1, off_loop_only: bool = False) -> None:
        """With `tracker_store="tests.faulty_store.FaultySQLTrackerStore"`: the next `count`
        statements whose SQL contains `table` (a table name, or e.g. "INSERT INTO x") fail as a
        database error (-1: until `heal_store`)."""
        self.fault_file.write_text(json.dumps({"table": table, "count": count, "off_loop_only": off_loop_only}))

    def heal_store(self) -> None:
        self.fault_file.unlink(missing_ok=True)

    def stop_rasa(self, instance: int) -> None:
        process = self.processes.pop(self._rasa_name(instance))
        process.terminate()
        process.wait(timeout=30)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @staticmethod
    def _rasa_name(instance: int) -> str:
        return "rasa" if instance == 0 else f"rasa{instance}"

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    # --- playing a customer through the simulator -------------------------------------------

    def customer_says(self, wa_id: str, spec: Any) -> Dict[str, Any]:
        body = {"text": spec} if isinstance(spec, str) else spec
        status, answer = http("POST", f"{self.sim_url}/_sim/customers/{wa_id}/messages", body)
        assert status == 200, answer
        return answer

    def wait_outbound(self, wa_id: str, count: int, timeout: float = 30) -> List[Dict[str, Any]]:
        """The bot's messages to a customer once there are at least `count` of them."""
        status, conversation = http(
            "GET", f"{self.sim_url}/_sim/conversations/{wa_id}/wait?outbound={count}&timeout={timeout}",
            timeout=timeout + 5,
        )
        assert status == 200, f"fewer than {count} bot messages to {wa_id}: {conversation}"
        return [m for m in conversation["messages"] if m["direction"] == "out"]

    def conversation(self, wa_id: str) -> Dict[str, Any]:
        status, conversation = http("GET", f"{self.sim_url}/_sim/conversations/{wa_id}")
        assert status == 200, conversation
        return conversation

    def stats(self) -> Dict[str, Any]:
        return http("GET", f"{self.sim_url}/_sim/stats")[1]

    def sim(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = http(method, f"{self.sim_url}/_sim/{path}", body)
        assert status == 200, answer
        return answer

    def sim_now(self) -> float:
        return float(self.sim("GET", "clock")["now_float"])

    def rasa(self, method: str, path: str, body: Any = None, instance: int = 0) -> Any:
        joiner = "&" if "?" in path else "?"
        status, answer = http(method, f"{self.rasa_urls[instance]}{path}{joiner}token={self.auth_token}", body)
        assert status == 200, answer
        return answer

    def agent(self, method: str, path: str, body: Any = None, instance: int = 0,
              token: Optional[str] = None) -> Tuple[int, Any]:
        """The agent API: (status, answer), with the agent token unless another is given."""
        token = self.agent_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return http(method, f"{self.rasa_urls[instance]}/webhooks/whatsapp/agent/{path}", body, headers)

    def window(self, sender_id: str, instance: int = 0) -> Dict[str, Any]:
        """The channel's view of a customer's care window."""
        return self.rasa("GET", f"/webhooks/whatsapp/conversations/{sender_id}", instance=instance)

    def tracker(self, sender_id: str, turns: int = 0, timeout: float = 10) -> Dict[str, Any]:
        """The customer's tracker once it holds `turns` saved turns (`user` events, external ones
        included): Rasa saves a turn after its last bot message went out, so a reply at the
        simulator comes a moment before the turn is in the tracker."""
        deadline = time.monotonic() + timeout
        while True:
            status, tracker = http("GET", f"{self.rasa_url}/conversations/{sender_id}/tracker?token={self.auth_token}")
            assert status == 200, tracker
            events = tracker["events"]
            saved = sum(e["event"] == "user" for e in events)
            ended = bool(events) and events[-1]["event"] == "action" and events[-1].get("name") == "action_listen"
            if (saved >= turns and (ended or not turns)) or time.monotonic() > deadline:
                return tracker
            time.sleep(0.05)

    # --- internals ----------------------------------------------------------------------------

    def _spawn(self, name: str, command: List[str]) -> None:
        self.logs[name] = self.workdir / f"{name}.log"
        with open(self.logs[name], "ab") as log:
            self.processes[name] = subprocess.Popen(command, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self, name: str, url: str, timeout: float = 120) -> None:
        process = self.processes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)[-3000:]}")
            try:
                if http("GET", url, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{name} not ready after {timeout}s:\n{self.log(name)[-3000:]}")


class FakeDesk:
    """A desk's webhook: records the handoff events it takes, checks their signature, and can be
    down (503)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.events = []
        self.refused = 0
        self.bad_signatures = 0
        self.down = False
        desk = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(desk.key.encode(), body, hashlib.sha256).hexdigest()
                if self.headers.get("X-Signature-256") != expected:
                    desk.bad_signatures += 1
                    self.send_response(401)
                elif desk.down:
                    desk.refused += 1
                    self.send_response(503)
                else:
                    desk.events.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/whatsapp-events"

    def of(self, sender_id, event=None):
        return [e for e in self.events if e["sender_id"] == sender_id and (event is None or e["event"] == event)]

    def wait(self, sender_id, event, count=1, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of(sender_id, event)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"the desk got {len(self.of(sender_id, event))} {event} event(s) for {sender_id}: "
                             f"{self.of(sender_id)}")
