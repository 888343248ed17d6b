#!/usr/bin/env bash
# Start one hospital's Flower SuperNode, pointed at its own records and site directory.
#   usage: start-supernode.sh ENV_FILE        (template: deploy/config/hospital.env.example)
# The ClientApp reads data-dir, site-dir and site-id from the node config; raw records stay here.
set -euo pipefail
[[ $# -eq 1 && -r "$1" ]] || { echo "usage: $0 ENV_FILE" >&2; exit 2; }
set -a; source "$1"; set +a

: "${SITE_ID:?}" "${DATA_DIR:?}" "${SITE_DIR:?}" "${SUPERLINK_ADDRESS:?host:port of the SuperLink}"
: "${SUPERNODE_PORT:=9094}" "${PMLM_TLS:=1}" "${FLWR_HOME:=$SITE_DIR/flwr-home}"
: "${SUPERNODE_MAX_RETRIES:=}" "${SUPERNODE_MAX_WAIT_S:=}"
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
exec flower-supernode "${args[@]}"
