"""`pmlm deploy local --sites 3 --quick`: a real SuperLink and three SuperNodes on loopback, TLS and
node authentication on, the app run with `flwr run`, every site checked, every process stopped.

The slowest test of the suite (about 1.5-3 minutes on two cores): one deployment carries every
acceptance check, including the two refusals (a plain-text connection to the TLS SuperLink, a
SuperNode whose key was never registered), which the command itself performs and reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pmlm.cli import main as pmlm_main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def pmlm_exe() -> str:
    beside = Path(sys.executable).with_name("pmlm")
    return str(beside) if beside.exists() else "pmlm"


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":  # zombies left to PID 1 hold no resources
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.mark.skipif(not any(SAMPLE.glob("*/*.csv*")), reason="the bundled sample consortium is not present")
def test_deploy_local_three_sites_quick(tmp_path):
    workdir = tmp_path / "deploy"
    done = subprocess.run([pmlm_exe(), "deploy", "local", "--sites", "3", "--quick", "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    report = json.loads((workdir / "deploy_report.json").read_text())
    failed = [c for c in report["checks"] if not c["ok"]]
    assert done.returncode == 0 and report["ok"] and not failed, (failed, done.stdout[-3000:], done.stderr[-3000:])

    checks = {c["name"] for c in report["checks"]}
    assert "plain-text connection to the TLS SuperLink refused" in checks
    assert "unregistered SuperNode refused" in checks
    assert "app run completed" in checks
    for site in ("hospital_a", "hospital_b", "hospital_c"):
        assert {f"{site}: node key registered", f"{site}: ledger verifies",
                f"{site}: phase_a artifact tied to its ledger release"} <= checks
    link_log = (workdir / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link_log  # the SuperLink's own words
    # Phases B and C ran under SecAgg+ on the real deployment, with every site to the end (the run's summary).
    (later,) = workdir.glob("coordinator/**/*-phases-bc.json")
    summary = json.loads(later.read_text())
    assert summary["secure_aggregation"] is True and "phase_b" in summary and "phase_c" in summary
    assert sorted(summary["roster"]["completed"]) == ["hospital_a", "hospital_b", "hospital_c"], summary["roster"]

    # every process it started is gone, with whatever they spawned
    assert len(report["stopped_pids"]) == 1 + 3 + 1  # SuperLink, three SuperNodes, the unregistered one
    for pid in report["stopped_pids"].values():
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"
    assert processes_mentioning(str(workdir)) == []
    for key in workdir.glob("keys/**/*.key"):
        assert key.stat().st_mode & 0o077 == 0


def test_deploy_local_refuses_more_sites_than_the_data_holds(tmp_path, capsys):
    (tmp_path / "only_site").mkdir()
    (tmp_path / "only_site" / "events.csv").write_text("patient_id,time,kind,system,code,display,value,unit\n")
    assert pmlm_main(["deploy", "local", "--sites", "2", "--data", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    assert "holds 1 hospitals" in capsys.readouterr().err
