"""The house's shape (#19): the package's imports, read from the source, hold no cycle, and the hospital's side
(client/) and the coordinator's (server/) never import each other: what they share lives in common/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pmlm.common.phase_a import PhaseAConfig
from pmlm.common.privacy.budget import PHASE_A_SHARE

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"pmlm.client": REPO / "client", "pmlm.common": REPO / "common", "pmlm.server": REPO / "server",
           "pmlm": REPO / "pmlm"}


def modules() -> dict[str, Path]:
    """Every module of the package by its import name (the folders are mapped into `pmlm` by setup.py)."""
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if name.split(".")[1:2] in (["client"], ["common"], ["server"]) and package == "pmlm":
                continue  # pmlm/ holds no such folders; the mapped ones win
            out[name] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that `path` imports, wherever the import stands (top, function or type check)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def test_the_hospital_and_the_coordinator_never_import_each_other(graph):
    crossing = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
                if (a.startswith("pmlm.client") and b.startswith("pmlm.server"))
                or (a.startswith("pmlm.server") and b.startswith("pmlm.client"))]
    assert not crossing, "client/ and server/ share only through common/: " + ", ".join(sorted(crossing))


def test_common_imports_neither_side_nor_the_command(graph):
    up = [f"{a} -> {b}" for a, targets in graph.items() if a.startswith("pmlm.common") for b in targets
          if not b.startswith("pmlm.common")]
    assert not up, ", ".join(sorted(up))


def test_no_import_cycle(graph):
    """Packages' faces (__init__) count as what they import; a cycle anywhere fails with its path."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_epsilon_in_the_run_config_is_the_whole_budget():
    """One word per quantity: `epsilon` is a site's whole budget, `phase-a-epsilon` phase A's share (default
    PHASE_A_SHARE of it); the older spelling (`epsilon-total` whole, `epsilon` phase A) still reads the same."""
    new = PhaseAConfig.from_run_config({"epsilon": 3.0})
    assert (new.epsilon_total, new.phase_a_epsilon) == (3.0, 3.0 * PHASE_A_SHARE)
    assert PhaseAConfig.from_run_config({"epsilon": 3.0, "phase-a-epsilon": 1.0}).phase_a_epsilon == 1.0
    old = PhaseAConfig.from_run_config({"epsilon": 1.2, "epsilon-total": 3.0})
    assert (old.epsilon_total, old.phase_a_epsilon) == (3.0, 1.2)
    assert PhaseAConfig.from_run_config({"epsilon": 3.0, "phase-a-epsilon": 0}).private is False


def test_the_phase_a_record_names_its_share_as_the_run_config_does():
    """On the wire phase A's share is `phase_a_epsilon`, as in the run config; a record from a coordinator of
    before the rename (`epsilon`) still asks for the same share, and never for the whole budget."""
    record = PhaseAConfig(phase_a_epsilon=0.7, epsilon_total=3.0).to_record()
    assert "epsilon" not in record and record["phase_a_epsilon"] == 0.7
    old = {k: v for k, v in record.items() if k != "phase_a_epsilon"} | {"epsilon": 0.4}
    assert PhaseAConfig.from_record(old).phase_a_epsilon == 0.4
    assert PhaseAConfig.from_record({**old, "phase_a_epsilon": 0.2}).phase_a_epsilon == 0.2


def test_the_client_app_loads_without_torch_or_opacus():
    """Under the Deployment Engine every message starts a fresh ClientApp process: loading the app must not cost the
    5 s of torch and Opacus that most messages (SecAgg+'s key stages, the stores, the ledger copy) never use."""
    import subprocess
    import sys

    probe = ("import sys, pmlm.client.client_app; "
             "print(sorted(m for m in ('torch', 'opacus', 'pmlm.client.phase_a', 'pmlm.common.model') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    # The app Flower loads per message (pyproject's clientapp) hands the message to the site worker when one
    # listens: it must not even pay the handlers' privacy accounting (dp-accounting pulls in SciPy, 1.3 s).
    probe = ("import sys, pmlm.client.node_app; print(sorted(m for m in ('torch', 'opacus', 'dp_accounting', "
             "'scipy', 'pmlm.client.client_app') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
