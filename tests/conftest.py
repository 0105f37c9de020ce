import os

# Before anything imports rasa / tensorflow / sqlalchemy.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
os.environ["RASA_TELEMETRY_ENABLED"] = "false"

import pytest  # noqa: E402

from tests.stack import Stack, new_wa_id  # noqa: E402


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One running system for every end-to-end test: the simulator, the action server and
    `rasa run` (SQLite tracker store). The follow-up reminder fires after 4 s instead of 30 h;
    tests let the hours pass on the simulator's clock, which the channel reads."""
    stack = Stack(tmp_path_factory.mktemp("e2e"), follow_up_seconds=4)
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture
def wa_id():
    return new_wa_id()
