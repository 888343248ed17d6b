#!/usr/bin/env bash
# Start one hospital's Flower SuperNode, pointed at its own records and site directory.
#   usage: start-supernode.sh ENV_FILE        (template: deploy/config/hospital.env.example)
# The ClientApp reads data-dir, site-dir and site-id from the node config; raw records stay here.
set -euo pipefail
[[ $# -eq 1 && -r "$1" ]] || { echo "usage: $0 ENV_FILE" >&2; exit 2; }
set -a; source "$1"; set +a

: "${SITE_ID:?}" "${DATA_DIR:?}" "${SITE_DIR:?}" "${SUPERLINK_ADDRESS:?host:port of the SuperLink}"
: "${SUPERNODE_PORT:=9094}" "${PMLM_TLS:=1}" "${FLWR_HOME:=$SITE_DIR/flwr-home}"
: "${SUPERNODE_MAX_RETRIES:=}" "${SUPERNODE_MAX_WAIT_S:=}" "${SITE_WORKER:=1}" "${SITE_WORKER_THREADS:=}"
# How soon a message is picked up: the SuperNode's idle poll (pmlm/deploy/supernode.py; 3 s in Flower's own loop).
: "${SUPERNODE_IDLE_POLL_S:=1}"
export SUPERNODE_IDLE_POLL_S
export FLWR_HOME FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
for path in "$DATA_DIR" "$SITE_DIR"; do
  [[ "$path" != *[[:space:]\"]* ]] || { echo "paths in the node config may not hold spaces or quotes: $path" >&2; exit 2; }
done
mkdir -p "$SITE_DIR"

args=(--superlink "$SUPERLINK_ADDRESS" --port "$SUPERNODE_PORT"
      --node-config "site-id=\"$SITE_ID\" data-dir=\"$DATA_DIR\" site-dir=\"$SITE_DIR\"")
[[ -z "$SUPERNODE_MAX_RETRIES" ]] || args+=(--max-retries "$SUPERNODE_MAX_RETRIES")
[[ -z "$SUPERNODE_MAX_WAIT_S" ]] || args+=(--max-wait-time "$SUPERNODE_MAX_WAIT_S")
if [[ "$PMLM_TLS" == 1 ]]; then
  : "${CA_CERT:?}" "${NODE_AUTH_KEY:?OpenSSH EC private key whose .pub the coordinator registered}"
  args+=(--root-certificates "$CA_CERT" --auth-supernode-private-key "$NODE_AUTH_KEY")
else
  echo "WARNING: PMLM_TLS=0: plain-text connection to the SuperLink (loopback rehearsal only)" >&2
  args+=(--insecure)
fi
worker_python="$(dirname "$(command -v flower-supernode)")/python"  # the environment PMLM is installed in
if [[ "$SITE_WORKER" == 1 && ! -x "$worker_python" ]]; then
  echo "WARNING: no python beside flower-supernode: no site worker, each message runs in its own process" >&2
elif [[ "$SITE_WORKER" == 1 ]]; then
  # A long-lived worker answers this node's messages (client/site_worker.py): Flower starts a process per message,
  # which then hands the message over instead of importing torch and reading the records again. It lives in this
  # process group and exits when the SuperNode (this shell, after exec) is gone.
  # It also takes the node's tasks from the SuperNode's runtime API itself (client/task_taker.py), so most
  # messages start no process at all. Flower's task launcher remains the fallback: it looks every 5 s (its own
  # default is 1 s) so that the worker, which looks four times a second, takes nearly every task.
  export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-5}"
  worker_args=(--site-dir "$SITE_DIR" --follow-parent --runtime-api "127.0.0.1:$SUPERNODE_PORT"
               --data-dir "$DATA_DIR" --site-id "$SITE_ID")
  [[ -z "$SITE_WORKER_THREADS" ]] || worker_args+=(--threads "$SITE_WORKER_THREADS")
  "$worker_python" -m pmlm.client.site_worker "${worker_args[@]}" &
fi
if [[ "$SUPERNODE_IDLE_POLL_S" != 3 && -x "$worker_python" ]]; then
  exec "$worker_python" -m pmlm.deploy.supernode "${args[@]}"  # Flower's SuperNode with a shorter idle poll
fi
exec flower-supernode "${args[@]}"
