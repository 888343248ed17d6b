#!/usr/bin/env bash
# Start the coordinator's Flower SuperLink with TLS and SuperNode authentication.
#   usage: start-superlink.sh ENV_FILE        (template: deploy/config/superlink.env.example)
# `exec` keeps this script's PID for the SuperLink, so systemd, docker and `pmlm deploy local`
# stop it by that PID.
set -euo pipefail
[[ $# -eq 1 && -r "$1" ]] || { echo "usage: $0 ENV_FILE" >&2; exit 2; }
set -a; source "$1"; set +a

: "${SUPERLINK_HOST:=127.0.0.1}" "${SUPERLINK_PORT:=8000}" "${PMLM_TLS:=1}"
: "${SUPERLINK_DATABASE:?path of the SuperLink state database}" "${FLWR_HOME:?Flower home of the SuperLink}"
export FLWR_HOME FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

args=(--host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" --database "$SUPERLINK_DATABASE"
      --disable-runtime-dependency-installation)
if [[ "$PMLM_TLS" == 1 ]]; then
  : "${CA_CERT:?}" "${SUPERLINK_CERT:?}" "${SUPERLINK_KEY:?}"
  args+=(--ssl-ca-certfile "$CA_CERT" --ssl-certfile "$SUPERLINK_CERT" --ssl-keyfile "$SUPERLINK_KEY"
         --enable-supernode-auth)
else
  echo "WARNING: PMLM_TLS=0: plain-text SuperLink without node authentication (loopback rehearsal only)" >&2
  args+=(--insecure)
fi
exec flower-superlink "${args[@]}"
