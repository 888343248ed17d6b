#!/usr/bin/env bash
# Admit one hospital: register its SuperNode's public key with the SuperLink (run by the coordinator's operator).
#   usage: register-supernode.sh SITE_ID PUBLIC_KEY [CONNECTION]
# CONNECTION names a [superlink.NAME] entry in $FLWR_HOME/config.toml (template: deploy/config/flwr-config.toml.example).
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 SITE_ID PUBLIC_KEY [CONNECTION]" >&2; exit 2; }
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec flwr supernode register "$2" "${3:-pmlm}" --name "$1" --format json
