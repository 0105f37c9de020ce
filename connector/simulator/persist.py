"""The simulator's memory on disk (`--state-file`, `SIM_STATE_FILE`): what Meta would still know
after the simulator restarts, so its conversations stay in step with the bot's tracker store.

Kept: every conversation (identity, window anchor, messages both ways with all their fields,
rejected sends), the clock offset, the burst serial and small media (each at most
`MEDIA_ITEM_MAX` bytes, `MEDIA_TOTAL_MAX` in all: the placeholder media customers send, and small
uploads; bigger uploads are not kept and answer as unknown media after a restart). The wamid
index is rebuilt from the messages. Not kept, being per run: stats, fault queues, the runtime
config knobs (window error mode, statuses, redelivery delays), queued status webhooks and
pending redeliveries (a status not yet sent when the simulator stops is never sent).

The clock keeps its *offset* from real time, not a frozen "now": time passes while the simulator
is down, as it does for Meta, and a customer whose window was lapsed by time travel stays lapsed.
That is what the bot needs: its channel reads this same clock (connector/clock.py) and keeps the
timestamps in its tracker; forgetting the offset would move "now" backwards, put remembered
messages in the future and reopen windows the bot has seen closed. `POST /_sim/clock
{"reset": true}` (or `/_sim/reset`) goes back to real time.

Writing: after a change, the whole state is written at most every `SAVE_INTERVAL` seconds (less
often when encoding it gets slow, so a big state never costs the loop more than a fifth of its
time), and once more on shutdown. The JSON is encoded on the loop, where the state cannot change
under it, then written by a single worker thread to a temp file that is renamed over the old
one: a crash leaves the previous complete file. A reset writes the empty state at once.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from aiohttp import web

from .state import Conversation, Record, SimState

log = logging.getLogger("connector.simulator")

VERSION = 1
SAVE_INTERVAL = 0.5  # seconds: the longest a change waits to be written while the loop is not busy
LOOP_SHARE = 0.2  # at most this share of the loop's time goes to encoding: the interval grows with the cost
MAX_SAVE_INTERVAL = 10.0
MEDIA_ITEM_MAX = 16 * 1024
MEDIA_TOTAL_MAX = 1024 * 1024

RECORD_FIELDS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Record))
RECORD_REQUIRED = frozenset(
    f.name for f in dataclasses.fields(Record)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
)


class StateFileError(ValueError):
    """The file is JSON, but not a state file this simulator can load."""


# --- encoding --------------------------------------------------------------------------------


def snapshot(state: SimState) -> Dict[str, Any]:
    """The state as plain JSON values; shares the records' payloads, so encode it at once."""
    return {
        "version": VERSION,
        "saved_at": time.time(),
        "clock_offset": state.clock.offset,
        "burst_serial": state.burst_serial,
        "conversations": [
            {
                "wa_id": c.wa_id,
                "user_id": c.user_id,
                "name": c.name,
                "last_inbound_at": c.last_inbound_at,
                "messages": [{name: getattr(m, name) for name in RECORD_FIELDS} for m in c.messages],
                "rejected": c.rejected,
            }
            for c in state.conversations.values()
        ],
        "media": _small_media(state.media),
    }


def _small_media(media: Dict[str, Tuple[bytes, str]]) -> Dict[str, Dict[str, str]]:
    out: Dict[str, Dict[str, str]] = {}
    total = 0
    for media_id, (data, mime_type) in media.items():
        if len(data) > MEDIA_ITEM_MAX or total + len(data) > MEDIA_TOTAL_MAX:
            continue
        total += len(data)
        out[media_id] = {"mime_type": mime_type, "data": base64.b64encode(data).decode("ascii")}
    return out


def encode(state: SimState) -> bytes:
    # ASCII escapes: a payload may hold lone surrogates (JSON "\ud800"), which UTF-8 cannot encode
    return json.dumps(snapshot(state), separators=(",", ":"), ensure_ascii=True).encode("ascii")


# --- decoding --------------------------------------------------------------------------------


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise StateFileError(what)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_str(item: Dict[str, Any], key: str, where: str) -> Optional[str]:
    value = item.get(key)
    _expect(value is None or isinstance(value, str), f"{where}: {key} must be a string or null")
    return value


def _record(item: Any, where: str) -> Record:
    _expect(isinstance(item, dict), f"{where} is not an object")
    missing = RECORD_REQUIRED - item.keys()
    _expect(not missing, f"{where} lacks {', '.join(sorted(missing))}")
    _expect(item["direction"] in ("in", "out"), f"{where}: direction must be 'in' or 'out'")
    _expect(isinstance(item["wamid"], str) and bool(item["wamid"]), f"{where}: wamid must be a string")
    _expect(_is_int(item["timestamp"]), f"{where}: timestamp must be an integer")
    _expect(isinstance(item["type"], str) and isinstance(item["phone_number_id"], str), f"{where}: type and phone_number_id must be strings")
    _expect(isinstance(item["payload"], dict), f"{where}: payload must be an object")
    for key in ("errors", "statuses"):
        _expect(isinstance(item.get(key, []), list), f"{where}: {key} must be a list")
    return Record(**{name: item[name] for name in RECORD_FIELDS if name in item})


def _conversation(item: Any, where: str) -> Conversation:
    _expect(isinstance(item, dict), f"{where} is not an object")
    wa_id = item.get("wa_id")
    _expect(isinstance(wa_id, str) and bool(wa_id), f"{where}: wa_id must be a non-empty string")
    where = f"conversation {wa_id}"
    last_inbound_at = item.get("last_inbound_at")
    _expect(last_inbound_at is None or _is_int(last_inbound_at), f"{where}: last_inbound_at must be an integer or null")
    messages, rejected = item.get("messages", []), item.get("rejected", [])
    _expect(isinstance(messages, list) and isinstance(rejected, list), f"{where}: messages and rejected must be lists")
    return Conversation(
        wa_id=wa_id, user_id=_optional_str(item, "user_id", where), name=_optional_str(item, "name", where),
        last_inbound_at=last_inbound_at, messages=[_record(m, f"{where}, message {i}") for i, m in enumerate(messages)],
        rejected=list(rejected),
    )


def _media(items: Any) -> Dict[str, Tuple[bytes, str]]:
    _expect(isinstance(items, dict), "media must be an object")
    media: Dict[str, Tuple[bytes, str]] = {}
    for media_id, item in items.items():
        _expect(isinstance(item, dict) and isinstance(item.get("mime_type"), str) and isinstance(item.get("data"), str),
                f"media {media_id} needs mime_type and data strings")
        media[media_id] = (base64.b64decode(item["data"], validate=True), item["mime_type"])
    return media


def restore(state: SimState, data: Any) -> None:
    """Load a decoded state file into `state`; all or nothing (`StateFileError`: nothing changed)."""
    _expect(isinstance(data, dict), "the file does not hold a JSON object")
    version = data.get("version")
    _expect(version == VERSION, f"version {version!r}, this simulator reads version {VERSION}")
    offset = data.get("clock_offset", 0.0)
    _expect(isinstance(offset, (int, float)) and not isinstance(offset, bool) and math.isfinite(offset),
            "clock_offset must be a finite number")
    serial = data.get("burst_serial", 0)
    _expect(_is_int(serial) and serial >= 0, "burst_serial must be an integer >= 0")
    items = data.get("conversations", [])
    _expect(isinstance(items, list), "conversations must be a list")
    conversations = [_conversation(item, f"conversation {i}") for i, item in enumerate(items)]
    media = _media(data.get("media", {}))

    state.conversations.clear()
    state.by_wamid.clear()
    for conv in conversations:
        state.conversations[conv.wa_id] = conv
        for record in conv.messages:
            state.by_wamid[record.wamid] = (conv, record)
    state.clock.offset = float(offset)
    state.burst_serial = max(state.burst_serial, serial)
    state.media.update(media)


# --- the writer ------------------------------------------------------------------------------


class Persister:
    """Loads `path` into `state` at start, writes it back after changes and on shutdown."""

    def __init__(self, path: Path, state: SimState, interval: float = SAVE_INTERVAL):
        self.path = Path(path)
        self.state = state
        self.interval = interval
        self.saves = 0  # files written (for tests and the shutdown log)
        self.last_encode_seconds = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-state-writer")  # writes in order
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._writing: Optional[asyncio.Future] = None
        self._dirty = False
        self._closed = False
        self._resets = state.resets
        self._unsubscribe: Callable[[], None] = lambda: None
        self._last_error: Optional[str] = None

    # --- start ---------------------------------------------------------------------------

    def load(self) -> None:
        """Fill the state from the file; a missing, unreadable or unusable file starts empty."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            log.info("state file %s does not exist yet: starting empty; it is written after the first change", self.path)
            return
        except OSError as exc:
            log.warning("cannot read the simulator state file %s (%s): starting empty", self.path, exc)
            return
        if not raw.strip():
            log.info("state file %s is empty: starting empty", self.path)
            return
        try:
            restore(self.state, json.loads(raw))
        except (ValueError, TypeError, RecursionError) as exc:  # StateFileError, bad JSON, bad UTF-8, bad base64
            kept = self._keep_aside()
            log.warning(
                "simulator state file %s is unusable (%s): starting empty; %s", self.path, exc,
                f"its content is kept in {kept}" if kept else "it is overwritten after the next change",
            )
            return
        messages = sum(len(c.messages) for c in self.state.conversations.values())
        offset = self.state.clock.offset
        log.info(
            "loaded %d conversations (%d messages) from state file %s%s", len(self.state.conversations), messages,
            self.path, f"; clock offset {offset:+.0f} s from an earlier run (POST /_sim/clock {{\"reset\": true}} undoes it)"
            if abs(offset) >= 1 else "",
        )

    def _keep_aside(self) -> Optional[Path]:
        aside = self.path.with_name(self.path.name + ".corrupt")
        try:
            os.replace(self.path, aside)
        except OSError:
            return None
        return aside

    def start(self) -> None:
        """Write after every change from now on (call on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._resets = self.state.resets
        self._unsubscribe = self.state.subscribe(self._changed)

    # --- changes -------------------------------------------------------------------------

    def _changed(self) -> None:
        if self._closed:
            return
        if self.state.resets != self._resets:
            self._resets = self.state.resets
            self._write_reset()
            return
        self._dirty = True
        self._schedule(self.interval)

    def _schedule(self, delay: float) -> None:
        if self._closed or self._timer is not None or self._writing is not None:
            return  # a write is due anyway, or one is under way and reschedules when done
        assert self._loop is not None
        self._timer = self._loop.call_later(delay, self._save)

    def _next_delay(self) -> float:
        return min(max(self.interval, self.last_encode_seconds / LOOP_SHARE), MAX_SAVE_INTERVAL)

    def _encode(self) -> Optional[bytes]:
        self._dirty = False
        started = time.perf_counter()
        try:
            data = encode(self.state)
        except Exception:
            log.exception("cannot encode the simulator state for %s", self.path)
            return None
        self.last_encode_seconds = time.perf_counter() - started
        return data

    def _save(self) -> None:
        self._timer = None
        data = self._encode()
        if data is None or self._loop is None:
            return
        self._writing = self._loop.run_in_executor(self._executor, self._write, data)
        self._writing.add_done_callback(self._written)

    def _written(self, future: asyncio.Future) -> None:
        self._writing = None
        if not future.cancelled():
            self._report(future.result())
        if self._dirty:
            self._schedule(self._next_delay())

    def _write_reset(self) -> None:
        """After a reset the file must be empty before the reset is answered: cancel the pending
        save and write now, behind any write already under way (one writer thread, in order)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        data = self._encode()
        if data is not None:
            self._report(self._executor.submit(self._write, data).result())

    # --- writing (in the writer thread) ----------------------------------------------------

    def _write(self, data: bytes) -> Optional[str]:
        """Write atomically: a temp file next to the target, then renamed over it. None, or the error."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            return f"{type(exc).__name__}: {exc}"
        self.saves += 1
        return None

    def _report(self, error: Optional[str]) -> None:
        if error and error != self._last_error:
            log.warning("cannot save the simulator state to %s (%s): going on without; trying again after the next change",
                        self.path, error)
        elif not error and self._last_error:
            log.info("state file %s is written again", self.path)
        self._last_error = error

    # --- stop ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop listening and write the last changes; the app's shutdown waits for it."""
        self._unsubscribe()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            try:
                await asyncio.shield(self._writing)
            except Exception:
                pass
        if self._dirty:
            data = self._encode()
            if data is not None:
                self._report(await asyncio.get_running_loop().run_in_executor(self._executor, self._write, data))
                if self._last_error is None:
                    log.info("saved %d conversations to state file %s", len(self.state.conversations), self.path)
        self._executor.shutdown(wait=True)


PERSISTER = web.AppKey("persister", Persister)
