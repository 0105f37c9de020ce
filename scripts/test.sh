#!/usr/bin/env bash
# The test command: set up (venv, model) if needed, then run every test. Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -m "not e2e"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec "$VENV/bin/python" -m pytest "$@"
