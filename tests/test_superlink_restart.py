"""The coordinator's SuperLink restarted in the middle of a run, on a real local deployment (TLS, node auth).

Two SuperNodes on the quick slice, phase A only. The SuperLink is stopped the way a service manager restarts it
(its process group and the SuperExec/ServerApp it started) while the sites train, then started again on the same
port and database. Flower 1.42 cannot resume a run whose ServerApp died: the interrupted run must end in a clear
state (failed, with Flower's reason), the SuperNodes must come back on their own under the same node ids, a new
run must complete, and every site's ledger must verify with each round charged once. Several minutes on two
busy cores (a deployment's start-up, Flower's 60 s task-heartbeat timeout, a second run): marked `deployment`,
which `make test` runs and `pytest -m "not deployment"` skips.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pmlm.deploy.app_bundle import QUICK_RUN_CONFIG, find_app_pyproject, write_app_bundle_dir
from pmlm.deploy.local import CONNECTION, LocalDeployment, quick_slice
from pmlm.deploy.processes import wait_for
from pmlm.common.privacy.ledger import verify_ledger
from pmlm.common.site_layout import LEDGER_PATH, SITE_KEY_PATH
from pmlm.common.privacy.signing import load_public_key, public_path

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
ROUNDS = 2  # the restart lands after a site's first release; each message starts a ClientApp process (seconds)


def online_nodes(deployment: LocalDeployment) -> set[str]:
    listing = deployment.flwr_json("supernode", "ls", CONNECTION)
    return {n["node-id"] for n in listing.get("nodes", []) if n.get("status") == "online"}


def run_status(deployment: LocalDeployment, run_id: str) -> dict:
    runs = deployment.flwr_json("ls", CONNECTION, "--run-id", run_id).get("runs") or [{}]
    return runs[0]


def phase_a_releases(site_dir: Path) -> list[dict]:
    replay = verify_ledger(site_dir / LEDGER_PATH, load_public_key(public_path(site_dir / SITE_KEY_PATH)))
    assert replay.ok, replay.problems[:3]
    return [e for e in replay.entries if e["kind"] == "release" and e["phase"] == "phase_a"]


@pytest.mark.deployment
@pytest.mark.skipif(not any(SAMPLE.glob("*/*.csv*")), reason="the bundled sample consortium is not present")
def test_superlink_restarted_mid_run(tmp_path):
    sites = dict(sorted((p.name, p) for p in SAMPLE.iterdir() if p.is_dir())[:2])
    sites = quick_slice(sites, tmp_path / "data", patients=20)
    config = {**QUICK_RUN_CONFIG, "phases": "a", "num-server-rounds": ROUNDS, "evaluate-each-round": False}
    deployment = LocalDeployment(tmp_path / "deploy", sites, run_config=config, timeout_s=600)
    status: dict = {}  # the interrupted run's, as `flwr ls` reports it
    try:
        deployment.prepare()
        deployment.start_superlink()
        deployment.register_sites()
        deployment.wait_nodes_online([deployment.start_supernode(site) for site in sites])
        nodes_before = online_nodes(deployment)

        # The first run, left running in the background.
        app_dir = write_app_bundle_dir(deployment.run_dir / "app", find_app_pyproject(),
                                       {**config, "workdir": str(deployment.run_dir / "coordinator")})
        started = deployment.flwr_json("run", str(app_dir), CONNECTION)
        assert started.get("success"), started
        interrupted = str(started["run-id"])
        wait_for(lambda: any(phase_a_ledger_has_a_release(deployment.site_dir(s)) for s in sites), 300, 0.5,
                 what="the first round's release at a site")
        assert run_status(deployment, interrupted).get("status") == "running"

        # Restart: stop the SuperLink with everything it started, then start it on the same port and database.
        old = deployment.superlink
        deployment.processes.stop(old)
        deployment.processes.started.remove(old)  # stopped and reaped: never signal its old PID again
        deployment.start_superlink()

        # The SuperNodes reconnect by themselves, under the node ids the database kept.
        wait_for(lambda: online_nodes(deployment) == nodes_before, 180, 2.0, what="the SuperNodes back online")

        # A new run after the restart completes (run_app records its own check).
        deployment.run_app()
        assert deployment.all_ok(), [vars(c) for c in deployment.checks if not c.ok]

        # The interrupted run ended in a clear state: completed, or failed with a reason.
        def interrupted_run_ended() -> bool:
            status.update(run_status(deployment, interrupted))
            return str(status.get("status", "")).startswith("finished")
        wait_for(interrupted_run_ended, 180, 2.0, what=f"run {interrupted} to end")
        assert status["status"] in ("finished:completed", "finished:failed"), status
        if status["status"] == "finished:failed":
            assert status.get("status-details") not in (None, "", "N/A"), status
    finally:
        deployment.processes.close()

    # Every ledger verifies; no round of any run is charged twice; the new run charged each of its rounds once.
    (summary_path,) = (deployment.run_dir / "coordinator" / "coordinator").glob("phase-a-*.json")
    summary = json.loads(summary_path.read_text())
    assert sorted(summary["roster"]["completed"]) == sorted(sites) and summary["roster"]["dropped"] == {}
    for site in sites:
        releases = phase_a_releases(deployment.site_dir(site))
        assert max(Counter((e["run_id"], e["round"]) for e in releases).values()) == 1
        by_run: dict[str, list[int]] = {}
        for e in releases:
            by_run.setdefault(e["run_id"], []).append(e["round"])
        assert by_run.pop(summary["run"]) == list(range(1, ROUNDS + 1))
        # The interrupted run: only the rounds it really trained, in order, each once. Sites may have released
        # every round before the restart while the ServerApp died before it finished (the run then failed): the
        # releases happened, so they stay charged.
        for rounds in by_run.values():
            assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) <= ROUNDS


def phase_a_ledger_has_a_release(site_dir: Path) -> bool:
    path = site_dir / LEDGER_PATH
    return path.is_file() and b'"kind":"release"' in path.read_bytes()
