"""The folder `flwr run` turns into the app bundle (FAB) for a deployment.

Why not `flwr run .` in the repository: the FAB bundles every .py/.toml/.md/.json file of the folder
(data/, tests/, bench/ ...) up to a 10 MB cap, `flwr run` may rewrite pyproject.toml, and an extracted
`pmlm/` folder would be put first on sys.path and shadow the installed `pmlm` package (whose
pmlm.client / pmlm.server come from other folders). So the bundle carries only the app's
pyproject.toml: components and run config. Every host runs the PMLM version it installed (runtime
dependency installation stays off), which is also what a hospital's change control wants.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from pmlm.common.atomic import write_atomic

APP_NAME = "pmlm"  # the bundle folder's name must be the project name for `flwr build`

# A short run of every phase: small model, few rounds, one local epoch, few points per patient.
QUICK_RUN_CONFIG: dict[str, Any] = {
    "num-server-rounds": 1, "local-epochs": 1, "batch-size": 8, "dim": 16, "max-history": 16,
    "points-per-patient": 4,
    # all three phases, each as small as still means something
    "phases": "abc", "phase-b-rounds": 1, "phase-b-prototypes": 3, "phase-b-min-count": 5,
    "phase-c-rounds": 1, "phase-c-points": 4, "phase-c-rate": 0.1, "phase-c-max-tokens": 48,
}


def find_app_pyproject(start: Path | None = None) -> Path:
    """The Flower app's pyproject.toml: the repository the `pmlm` package was installed from."""
    here = Path(start) if start else Path(__file__).resolve().parents[2]
    path = here / "pyproject.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no pyproject.toml with the Flower app at {here}; pass --app-pyproject")
    return path


def parse_run_config(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, VALUE read as TOML (3, 0.5, true, "text"); bare words stay strings."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"run config must be KEY=VALUE, got {pair!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw
    return values


def write_app_bundle_dir(out: Path, app_pyproject: Path, run_config: dict[str, Any]) -> Path:
    """Write OUT/pmlm/pyproject.toml: the app's [project] and [tool.flwr], run config defaults replaced."""
    source = tomllib.loads(Path(app_pyproject).read_text())
    flwr = source.get("tool", {}).get("flwr", {})
    if "components" not in flwr.get("app", {}):
        raise ValueError(f"{app_pyproject} has no [tool.flwr.app.components]")
    app = {key: value for key, value in flwr["app"].items()}
    app["config"] = {**app.get("config", {}), **run_config}
    project = {key: source["project"][key] for key in ("name", "version", "description", "license")
               if key in source["project"]}
    project["dependencies"] = []  # hosts install PMLM themselves; the bundle installs nothing
    folder = Path(out) / APP_NAME
    write_atomic(folder / "pyproject.toml", tomli_w.dumps({"project": project, "tool": {"flwr": {"app": app}}}))
    return folder
