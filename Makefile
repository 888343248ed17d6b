# The two commands of the README. Both create/reuse .venv and install what they need.
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

.PHONY: demo test bench

demo:
	bash scripts/setup.sh
	.venv/bin/pmlm demo

test:
	bash scripts/setup.sh --dev
	.venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart 0 --durations=25

bench:
	bash scripts/setup.sh --dev
	for b in bench/*.py; do .venv/bin/python $$b || exit 1; done
