#!/usr/bin/env bash
# The run command: the bot (rasa run with the WhatsApp channel and its HTTP API behind a token),
# the action server and the local Cloud API simulator, wired together. Prints "run: ready" once
# all of them answer; Ctrl-C stops all three; if one of them exits, the others are stopped too.
set -euo pipefail
started=$EPOCHREALTIME
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

# Simulator defaults; point these at Meta to use a real number (README "Connect a real number").
export WHATSAPP_ACCESS_TOKEN=${WHATSAPP_ACCESS_TOKEN:-sim-access-token}
export WHATSAPP_PHONE_NUMBER_ID=${WHATSAPP_PHONE_NUMBER_ID:-106540352242922}
export WHATSAPP_APP_SECRET=${WHATSAPP_APP_SECRET:-sim-app-secret}
export WHATSAPP_VERIFY_TOKEN=${WHATSAPP_VERIFY_TOKEN:-sim-verify-token}
export WHATSAPP_BUSINESS_ACCOUNT_ID=${WHATSAPP_BUSINESS_ACCOUNT_ID-102290129340398}  # the simulator's
export SIM_PORT=${SIM_PORT:-5090}
export SIM_STATE_FILE=${SIM_STATE_FILE-.sim-state.json}  # the simulator keeps its conversations across restarts; SIM_STATE_FILE= turns it off
export WHATSAPP_API_URL=${WHATSAPP_API_URL:-http://127.0.0.1:$SIM_PORT}
if [[ $WHATSAPP_API_URL == http://127.0.0.1:$SIM_PORT ]]; then
  export WHATSAPP_SIMULATOR_CLOCK_URL=${WHATSAPP_SIMULATOR_CLOCK_URL-$WHATSAPP_API_URL}
fi
export WHATSAPP_SIMULATOR_CLOCK_URL=${WHATSAPP_SIMULATOR_CLOCK_URL:-}
export SIM_BOT_WEBHOOK_URL=${SIM_BOT_WEBHOOK_URL:-http://127.0.0.1:5005/webhooks/whatsapp/webhook}
made_up=()  # tokens this run makes up: printed with the "ready" line
if [ -z "${RASA_AUTH_TOKEN:-}" ]; then
  RASA_AUTH_TOKEN=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(24))')  # hex: never a leading "-" (a flag to rasa)
  made_up+=(RASA_AUTH_TOKEN)
fi
export RASA_AUTH_TOKEN
if [ -z "${WHATSAPP_AGENT_TOKEN:-}" ]; then
  WHATSAPP_AGENT_TOKEN=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(24))')
  made_up+=(WHATSAPP_AGENT_TOKEN)
fi
export WHATSAPP_AGENT_TOKEN
export WHATSAPP_HANDOFF_WEBHOOK_URL=${WHATSAPP_HANDOFF_WEBHOOK_URL:-}

pids=()
declare -A names=()
ready_pid=
cleanup() {
  [ -z "$ready_pid" ] || kill "$ready_pid" 2>/dev/null || true
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

simulator=false
if [[ $WHATSAPP_API_URL == http://127.0.0.1:$SIM_PORT ]]; then
  simulator=true
  "$VENV/bin/python" -m connector.simulator serve &
  pids+=($!); names[$!]="the simulator (python -m connector.simulator serve)"
fi
"$VENV/bin/rasa" run actions --actions actions --port 5055 &
pids+=($!); names[$!]="the action server (rasa run actions)"
"$VENV/bin/rasa" run --model "$MODEL" --port 5005 --credentials credentials.yml \
  --endpoints endpoints.yml --enable-api --auth-token "$RASA_AUTH_TOKEN" &
pids+=($!); names[$!]="the bot (rasa run)"
echo "run: starting (a \"ready\" line follows in about 20-25 s)"

# Ready: the action server answers /health and the WhatsApp channel's intake has started (it
# names this instance at /webhooks/whatsapp/intake; without api_token that route is off and the
# channel's /webhooks/whatsapp/ answering is taken). Rasa answers / and /webhooks/whatsapp/ while
# the channel still opens its state, so those alone come a little early. Runs beside `wait -n`.
ready_check=$(cat <<'PYTHON'
import json, os, sys, time, urllib.error, urllib.request

def get(url, token=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except (OSError, ValueError):
        return None, b""

def channel_ready():
    status, body = get("http://127.0.0.1:5005/webhooks/whatsapp/intake", os.environ["RASA_AUTH_TOKEN"])
    if status == 200:
        try:
            return bool(json.loads(body).get("instance"))
        except ValueError:
            return False
    return status == 404 and get("http://127.0.0.1:5005/webhooks/whatsapp/")[0] == 200

simulator = os.environ["RUN_SIMULATOR"] == "true"
sim = f"http://127.0.0.1:{os.environ['SIM_PORT']}"
deadline = time.time() + 600
while not (get("http://127.0.0.1:5055/health")[0] == 200 and channel_ready()
           and (not simulator or get(f"{sim}/_sim/health")[0] == 200)):
    if time.time() > deadline:
        sys.exit("run: not ready after 10 min: the bot (:5005) or the action server (:5055) does not answer")
    time.sleep(0.25)
took = time.time() - float(os.environ["RUN_STARTED"])
names = ("RASA_AUTH_TOKEN", "WHATSAPP_AGENT_TOKEN")
made = [name for name in names if name in os.environ["RUN_MADE_UP"].split()]
kept = [name for name in names if name not in made]
if simulator:
    lines = [f"run: ready in {took:.0f} s. Open {sim}/ (the simulator's page) or, in another terminal:"]
else:
    lines = [f"run: ready in {took:.0f} s; the bot takes webhooks at http://127.0.0.1:5005/webhooks/whatsapp/webhook."
             " In another terminal:"]
if made:
    lines.append("  export " + " ".join(f"{name}={os.environ[name]}" for name in made)
                 + (f"   # and your {' and '.join(kept)}" if kept else ""))
else:
    lines.append(f"  export {' '.join(names)}   # the values you started run.sh with")
if simulator:
    lines.append('  .venv/bin/python -m connector.simulator say 15551234567 "hi"')
    lines.append("  .venv/bin/python -m connector.simulator show 15551234567")
else:
    lines.append("  .venv/bin/python -m connector.simulator agent list")
print("\n".join(lines), flush=True)
PYTHON
)
RUN_STARTED=$started RUN_SIMULATOR=$simulator RUN_MADE_UP="${made_up[*]}" "$VENV/bin/python" -c "$ready_check" &
ready_pid=$!

status=0 gone=0
wait -n -p gone "${pids[@]}" || status=$?
when="after the bot was ready"
! kill -0 "$ready_pid" 2>/dev/null || when="before the bot was ready"
echo "run: ${names[$gone]:-a process} exited with status $status $when (its output is above); stopping the others" >&2
[ "$status" -ne 0 ] || status=1
exit "$status"
