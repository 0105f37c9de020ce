#!/usr/bin/env bash
# Makes the project runnable from a fresh clone: a Python 3.10 venv with the pinned
# requirements (recreated when requirements.txt changes) and a trained model (retrained when
# config.yml, domain.yml or data/ change). Sourced by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
MODEL=$ROOT/models/whatsapp-demo.tar.gz
export TF_CPP_MIN_LOG_LEVEL=2 SQLALCHEMY_SILENCE_UBER_WARNING=1 PYTHONDONTWRITEBYTECODE=1
# Rasa phones home (Segment telemetry, Sentry error reports) from the `rasa` command; this
# project's machines may only reach package registries, and a bot's errors are its own.
export RASA_TELEMETRY_ENABLED=false

find_python310() {
  local candidate
  for candidate in "${PYTHON310:-}" python3.10 /root/.pyenv/versions/3.10*/bin/python3.10 \
      "$HOME"/.pyenv/versions/3.10*/bin/python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; then
      command -v "$candidate" || echo "$candidate"
      return 0
    fi
  done
  echo "bootstrap: Python 3.10 not found (rasa 3.6 needs it); set PYTHON310=/path/to/python3.10" >&2
  return 1
}

requirements_hash=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$requirements_hash" ]; then
  python310=$(find_python310)
  echo "bootstrap: creating $VENV with $python310 and installing requirements.txt (about 3 minutes)"
  bootstrap_started=$SECONDS
  rm -rf "$VENV"
  "$python310" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip==24.2
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  echo "$requirements_hash" > "$VENV/.requirements.sha256"
  echo "bootstrap: installed in $((SECONDS - bootstrap_started)) s"
fi

# Sentry is set up whenever the wheel ships its `keys` file, whatever RASA_TELEMETRY_ENABLED
# says; without the file Rasa runs as in its own development mode and reports nothing.
keys_file=$("$VENV/bin/python" -c 'import os, rasa; print(os.path.join(os.path.dirname(rasa.__file__), "keys"))')
[ ! -s "$keys_file" ] || [ "$(cat "$keys_file")" = "{}" ] || echo "{}" > "$keys_file"

training_hash=$(cat config.yml domain.yml $(find data -type f | sort) | sha256sum | cut -d' ' -f1)
if [ ! -f "$MODEL" ] || [ "$(cat "$MODEL.sha256" 2>/dev/null)" != "$training_hash" ]; then
  echo "bootstrap: training the model (config.yml, domain.yml or data/ changed; about a minute)"
  bootstrap_started=$SECONDS
  "$VENV/bin/rasa" train --fixed-model-name whatsapp-demo --out models --quiet
  echo "bootstrap: trained in $((SECONDS - bootstrap_started)) s"
  echo "$training_hash" > "$MODEL.sha256"
fi
