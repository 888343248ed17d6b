"""The run config: what the coordinator's operator asks of a run (`flwr run --run-config`, pyproject.toml's
[tool.flwr.app.config], or `pmlm train`/`pmlm demo`). Each phase reads its own keys from it (common/phase_a.py,
phase_b.py, phase_c.py); a site reads only where its data and work folders are in simulation (client/sites.py).
"""

from __future__ import annotations

import json
import os


def run_config_of(context_run_config: dict) -> dict:
    """The run config, with `PMLM_RUN_CONFIG` (JSON) filling in what Flower's in-code simulation cannot pass."""
    return {**json.loads(os.environ.get("PMLM_RUN_CONFIG", "{}")), **dict(context_run_config)}
