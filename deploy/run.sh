#!/usr/bin/env bash
# N `rasa run` instances with the WhatsApp channel behind nginx, sharing PostgreSQL (tracker store,
# the channel's inbox and care-window state) and Redis (lock store): README "Scale out behind nginx".
#
#   bash deploy/run.sh          # the action server, INSTANCES instances on ports 5005.., nginx; foreground
#   bash deploy/run.sh nginx    # only nginx in the foreground, for instances started elsewhere
#   bash deploy/run.sh conf     # print the nginx.conf it would run
#
# Reads (defaults in brackets): INSTANCES [2], FIRST_PORT [5005], RASA_PORTS [FIRST_PORT..,
# one per instance], NGINX_LISTEN [8080, or e.g. 127.0.0.1:8080], RUN_DIR [.deploy: nginx's prefix
# with its config, pid, logs and temp dirs, and the instances' logs], ACTION_SERVER_URL [an action server started here on 5055], POSTGRES_HOST [127.0.0.1],
# POSTGRES_PORT [5432], POSTGRES_DB [rasa], POSTGRES_USER [postgres], POSTGRES_PASSWORD [],
# REDIS_HOST [127.0.0.1], REDIS_PORT [6379], REDIS_DB [1], REDIS_PASSWORD []; RASA_AUTH_TOKEN and
# the WHATSAPP_* variables of credentials.yml must be set (Rasa names any that is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${1:-all}
INSTANCES=${INSTANCES:-2}
FIRST_PORT=${FIRST_PORT:-5005}
if [ -z "${RASA_PORTS:-}" ]; then
  RASA_PORTS=$(seq -s ' ' "$FIRST_PORT" $((FIRST_PORT + INSTANCES - 1)))
fi
NGINX_LISTEN=${NGINX_LISTEN:-8080}
RUN_DIR=${RUN_DIR:-$PWD/.deploy}

# deploy/nginx.conf with one upstream `server` line per port and the listen address filled in.
nginx_conf() {
  awk -v ports="$RASA_PORTS" -v listen="$NGINX_LISTEN" '
    / # instance$/ {
      if (!done) {
        n = split(ports, port, " ")
        for (i = 1; i <= n; i++) { line = $0; sub(/:[0-9]+ /, ":" port[i] " ", line); print line }
        done = 1
      }
      next
    }
    / # listen$/ { sub(/listen [^;]*;/, "listen " listen ";") }
    { print }' deploy/nginx.conf
}

run_nginx() {  # in the foreground, as its own process (exec), with everything under RUN_DIR
  command -v nginx >/dev/null || { echo "deploy/run.sh: nginx not found: apt-get install nginx" >&2; exit 1; }
  mkdir -p "$RUN_DIR"
  nginx_conf > "$RUN_DIR/nginx.conf"
  exec nginx -p "$RUN_DIR" -c "$RUN_DIR/nginx.conf" -e "$RUN_DIR/error.log" -g 'daemon off;'
}

case $mode in
  conf) nginx_conf; exit 0 ;;
  nginx) run_nginx ;;
  all) ;;
  *) echo "usage: deploy/run.sh [conf|nginx]" >&2; exit 2 ;;
esac

source scripts/bootstrap.sh  # VENV and MODEL: the venv and the trained model, as scripts/run.sh has them
: "${RASA_AUTH_TOKEN:?set RASA_AUTH_TOKEN: the token of Rasa's HTTP API and the channel's api_token}"
command -v nginx >/dev/null || { echo "deploy/run.sh: nginx not found: apt-get install nginx" >&2; exit 1; }
export POSTGRES_HOST=${POSTGRES_HOST:-127.0.0.1} POSTGRES_PORT=${POSTGRES_PORT:-5432}
export POSTGRES_DB=${POSTGRES_DB:-rasa} POSTGRES_USER=${POSTGRES_USER:-postgres} POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-}
export REDIS_HOST=${REDIS_HOST:-127.0.0.1} REDIS_PORT=${REDIS_PORT:-6379} REDIS_DB=${REDIS_DB:-1} REDIS_PASSWORD=${REDIS_PASSWORD:-}
export SANIC_WORKERS=1  # one process per instance: scale with instances (README)
mkdir -p "$RUN_DIR"

pids=()
trap '[ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null; wait' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ -z "${ACTION_SERVER_URL:-}" ]; then
  export ACTION_SERVER_URL=http://127.0.0.1:5055/webhook
  "$VENV/bin/rasa" run actions --actions actions --port 5055 >"$RUN_DIR/actions.log" 2>&1 &
  pids+=($!)
fi
for port in $RASA_PORTS; do
  "$VENV/bin/rasa" run --model "$MODEL" --port "$port" --credentials credentials.yml \
    --endpoints deploy/endpoints.yml --enable-api --auth-token "$RASA_AUTH_TOKEN" >"$RUN_DIR/rasa-$port.log" 2>&1 &
  pids+=($!)
done
run_nginx &
pids+=($!)
echo "deploy: nginx on $NGINX_LISTEN in front of rasa run on ${RASA_PORTS// /, } (logs in $RUN_DIR);" \
     "Meta's webhook URL: https://<this host>/webhooks/whatsapp/webhook"
wait -n "${pids[@]}" || true
echo "deploy: a process exited (see $RUN_DIR/*.log); stopping the others" >&2
exit 1
