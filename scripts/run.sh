#!/usr/bin/env bash
# The run command: the bot (rasa run with the WhatsApp channel and its HTTP API behind a token),
# the action server and the local Cloud API simulator, wired together. Ctrl-C stops all three.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

# Simulator defaults; point these at Meta to use a real number (README "Connect a real number").
export WHATSAPP_ACCESS_TOKEN=${WHATSAPP_ACCESS_TOKEN:-sim-access-token}
export WHATSAPP_PHONE_NUMBER_ID=${WHATSAPP_PHONE_NUMBER_ID:-106540352242922}
export WHATSAPP_APP_SECRET=${WHATSAPP_APP_SECRET:-sim-app-secret}
export WHATSAPP_VERIFY_TOKEN=${WHATSAPP_VERIFY_TOKEN:-sim-verify-token}
export WHATSAPP_BUSINESS_ACCOUNT_ID=${WHATSAPP_BUSINESS_ACCOUNT_ID-102290129340398}  # the simulator's
export SIM_PORT=${SIM_PORT:-5090}
export WHATSAPP_API_URL=${WHATSAPP_API_URL:-http://127.0.0.1:$SIM_PORT}
if [[ $WHATSAPP_API_URL == http://127.0.0.1:$SIM_PORT ]]; then
  export WHATSAPP_SIMULATOR_CLOCK_URL=${WHATSAPP_SIMULATOR_CLOCK_URL-$WHATSAPP_API_URL}
fi
export WHATSAPP_SIMULATOR_CLOCK_URL=${WHATSAPP_SIMULATOR_CLOCK_URL:-}
export SIM_BOT_WEBHOOK_URL=${SIM_BOT_WEBHOOK_URL:-http://127.0.0.1:5005/webhooks/whatsapp/webhook}
if [ -z "${RASA_AUTH_TOKEN:-}" ]; then
  RASA_AUTH_TOKEN=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(24))')  # hex: never a leading "-" (a flag to rasa)
  echo "run: RASA_AUTH_TOKEN was not set; this run's HTTP API token is $RASA_AUTH_TOKEN"
fi
export RASA_AUTH_TOKEN
if [ -z "${WHATSAPP_AGENT_TOKEN:-}" ]; then
  WHATSAPP_AGENT_TOKEN=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(24))')
  echo "run: WHATSAPP_AGENT_TOKEN was not set; this run's agent API token is $WHATSAPP_AGENT_TOKEN"
fi
export WHATSAPP_AGENT_TOKEN
export WHATSAPP_HANDOFF_WEBHOOK_URL=${WHATSAPP_HANDOFF_WEBHOOK_URL:-}

pids=()
cleanup() { [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [[ $WHATSAPP_API_URL == http://127.0.0.1:$SIM_PORT ]]; then
  "$VENV/bin/python" -m connector.simulator serve &
  pids+=($!)
fi
"$VENV/bin/rasa" run actions --actions actions --port 5055 &
pids+=($!)
"$VENV/bin/rasa" run --model "$MODEL" --port 5005 --credentials credentials.yml \
  --endpoints endpoints.yml --enable-api --auth-token "$RASA_AUTH_TOKEN" &
pids+=($!)

cat <<MSG
run: starting (the bot answers after about 35 s). Play a customer from another terminal:
  .venv/bin/python -m connector.simulator say 15551234567 "hi"
  .venv/bin/python -m connector.simulator show 15551234567
MSG
wait -n "${pids[@]}"
