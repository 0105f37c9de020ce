"""Rasa's SQL tracker store whose database fails on demand, for `rasa run` in the fault tests:
while the file named by STORE_FAULTS_FILE says so, statements touching a table raise the error a
database that went away raises (`table` is matched as text in the SQL). Rasa's own calls and the channel's state share the engine, so the
fault hits both, as a real outage would."""

import json
import os
import threading

import sqlalchemy as sa
from rasa.core.tracker_store import SQLTrackerStore

_lock = threading.Lock()


class InjectedOutage(Exception):
    pass


class FaultySQLTrackerStore(SQLTrackerStore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._faults = os.environ.get("STORE_FAULTS_FILE", "")
        sa.event.listen(self.engine, "before_cursor_execute", self._maybe_fail)

    def _maybe_fail(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if not self._faults or not os.path.exists(self._faults):
            return
        with _lock:
            try:
                with open(self._faults) as file:
                    fault = json.load(file)
            except (OSError, ValueError):
                return
            if fault["table"] not in statement:
                return
            if fault.get("off_loop_only") and threading.current_thread() is threading.main_thread():
                return
            if fault["count"] > 0:
                fault["count"] -= 1
                if fault["count"] == 0:
                    os.unlink(self._faults)
                else:
                    with open(self._faults, "w") as file:
                        json.dump(fault, file)
        raise sa.exc.OperationalError(statement, parameters, InjectedOutage("the database went away (injected)"))
