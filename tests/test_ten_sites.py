"""Ten sites through every phase (#18): a resampled consortium of ten small sites runs phases A, B and C through the
real ServerApp and ClientApp in-process, and every site takes part in every release, keeps what it received and
stays within its budget. Orchestration at S = 10, not quality: the LLM is the fake endpoint (tests/fake_llm.py).
"""

from __future__ import annotations

import collections
import json

import pytest

from pmlm.client.client_app import app as client_app
from pmlm.client.synth_consortium import synthesize_consortium
from pmlm.common.privacy.ledger import verify_ledger
from pmlm.common.profiles import load_profile
from pmlm.common.site_layout import LEDGER_PATH, MODEL_DIR, PEER_PROFILES, POLICY
from pmlm.server.in_process import run_in_process
from pmlm.server.server_app import app as server_app

from conftest import SAMPLE
from fake_llm import FakeOpenAIServer, serving

SITES, PATIENTS, BUDGET = 10, 14, 3.0
RUN_CONFIG = {
    "num-server-rounds": 1, "local-epochs": 1, "batch-size": 16, "epsilon": BUDGET, "delta": 1e-5, "dim": 16,
    "points-per-patient": 4, "phases": "abc", "min-nodes": SITES, "phase-b-rounds": 1, "phase-b-prototypes": 3,
    "phase-b-min-count": 5, "phase-c-rounds": 1, "phase-c-points": 3, "phase-c-rate": 0.3, "phase-c-candidates": 2,
    "phase-c-max-tokens": 16,
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    data = tmp_path_factory.mktemp("ten") / "consortium"
    synthesize_consortium(data, SITES, PATIENTS, load_profile("obgyn"), SAMPLE / "small_clinic_e", seed=10,
                          progress=False)
    work = tmp_path_factory.mktemp("ten-work")
    with serving(FakeOpenAIServer(text="- Schedule a prenatal visit.\n- Check blood pressure.")) as llm:
        llm_config = json.dumps({"base_url": llm.base_url, "model": "fake-model", "cache_dir": ""})
        nodes = [{"data-dir": str(site), "site-id": site.name, "site-dir": str(work / "sites" / site.name),
                  "llm": llm_config} for site in sorted(p for p in data.iterdir() if p.is_dir())]
        grid, _ = run_in_process(server_app, client_app, nodes, {**RUN_CONFIG, "workdir": str(work)})
        asked = len(llm.requests)
    return work, nodes, grid, asked


def test_the_coordinator_records_what_phase_cs_release_carried(federation):
    work, _, _, _ = federation
    (summary,) = (work / "coordinator").glob("*-phases-bc.json")
    released = json.loads(summary.read_text())["phase_c"]["released"]
    assert len(released) == RUN_CONFIG["phase-c-rounds"]
    for figures in released:  # from the released sum and the sites' public noise alone
        assert figures["dim"] > 0 and figures["noise_norm"] > 0 and figures["ratio"] > 0 and figures["snr"] >= 0


def test_ten_sites_answer_every_message_of_every_phase(federation):
    _, nodes, grid, asked = federation
    assert len(nodes) == SITES
    assert not [r.error.reason for _, r in grid.outbox if r.has_error()]
    by_site = collections.defaultdict(collections.Counter)
    for node_id, reply in grid.outbox:
        by_site[node_id][reply.metadata.message_type] += 1
    assert len(by_site) == SITES
    # Every site was in every release: the same messages, as many times, at each of the ten.
    first = next(iter(by_site.values()))
    assert all(counts == first for counts in by_site.values()), by_site
    assert {"train", "query.store_model", "train.pmlm_secure_sum", "query.phase_b_store",
            "query.phase_c_store", "query.ledger_entries"} <= set(first)
    assert first["train.pmlm_secure_sum"] % 4 == 0  # SecAgg+'s four stages, per secure sum (B's and C's)
    assert asked > 0  # phase C's rewards came from LLM answers


def test_each_site_keeps_every_phases_artifact_and_stays_within_its_budget(federation):
    work, nodes, _, _ = federation
    for node in nodes:
        site_dir = work / "sites" / node["site-id"]
        assert any((site_dir / MODEL_DIR).iterdir()), node["site-id"]
        assert list(site_dir.glob(f"{PEER_PROFILES}*")), node["site-id"]
        assert (site_dir / POLICY).is_file(), node["site-id"]
        replay = verify_ledger(site_dir / LEDGER_PATH)
        assert replay.problems == [], (node["site-id"], replay.problems)
        spent = replay.state.spent("patient-in-site", None)
        phases = {phase for phase in ("phase_a", "phase_b", "phase_c")
                  if replay.state.spent("patient-in-site", phase).pld > 0}
        assert phases == {"phase_a", "phase_b", "phase_c"}, (node["site-id"], phases)
        assert 0 < spent.pld <= BUDGET, (node["site-id"], spent)
