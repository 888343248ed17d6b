"""Phase A: the recommender, DP-SGD charged to the ledger, what leaves a site, the stored model, self features.

A tiny synthetic consortium (3 hospitals x 12 pregnant women, CSV) keeps the whole file well under a minute.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from pmlm.client.client_app import app as client_app
from pmlm.client.examples import Example, HistoryItem
from pmlm.client.features import FeatureEncoder, PatientDataset
from pmlm.client.phase_a import load_global_model
from pmlm.common.phase_a import MODEL_ARRAY, PHASE, PhaseAConfig, pack_model, unpack_model
from pmlm.client.assemble.self_informed import self_informed_features
from pmlm.common.model import build_model
from pmlm.common.privacy.ledger import verify_ledger
from pmlm.common.profiles import load_profile
from pmlm.server.in_process import run_in_process
from pmlm.server.server_app import app as server_app

SNOMED, LOINC = "http://snomed.info/sct", "http://loinc.org"
ROUNDS, EPSILON, DELTA = 2, 3.0, 1e-5
RUN_CONFIG = {"num-server-rounds": ROUNDS, "local-epochs": 1, "phase-a-epsilon": EPSILON, "delta": DELTA, "batch-size": 4,
              "dim": 16, "max-history": 16, "points-per-patient": 4, "evaluate-each-round": True}
logging.getLogger("absl").setLevel(logging.ERROR)


def _write_site(folder: Path, site: str, women: int, rng: random.Random) -> list[str]:
    """Pregnancies on the generator's schedule: initial visit, then visits every 4 weeks with the usual procedures."""
    folder.mkdir(parents=True)
    rows, ids = [], []
    for w in range(women):
        pid = f"{site}-patient-{w:03d}-{rng.randrange(10**6):06d}"
        ids.append(pid)
        born = datetime(1990 + w % 10, 1 + w % 12, 1, tzinfo=timezone.utc)
        start = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=rng.randrange(300))
        rows.append([pid, born.isoformat(), "patient", "", "female", "", "", "", "", ""])
        rows.append([pid, start.isoformat(), "condition", SNOMED, "72892002", "Normal pregnancy", "", "",
                     (start + timedelta(days=266)).isoformat(), ""])
        for v in range(9):
            t = start + timedelta(days=42 + 28 * v)
            code = ("424441002", "Prenatal initial visit") if v == 0 else ("424619006", "Prenatal visit")
            rows.append([pid, t.isoformat(), "encounter", SNOMED, *code, "", "", "", "AMB"])
            rows.append([pid, t.isoformat(), "procedure", SNOMED, "225158009", "Auscultation of fetal heart", "", "", "", ""])
            if v >= 2:
                rows.append([pid, t.isoformat(), "procedure", SNOMED, "274804006", "Fundal height", "", "", "", ""])
            rows.append([pid, t.isoformat(), "observation", LOINC, "8480-6", "Systolic Blood Pressure",
                         str(110 + rng.randrange(20) + (5 * v if w % 3 == 0 else 0)), "mm[Hg]", "", ""])
            rows.append([pid, t.isoformat(), "observation", LOINC, "8462-4", "Diastolic Blood Pressure",
                         str(70 + rng.randrange(10)), "mm[Hg]", "", ""])
    with open(folder / "events.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "time", "kind", "system", "code", "display", "value", "unit", "end",
                         "encounter_class"])
        writer.writerows(rows)
    return ids


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phase_a")
    rng = random.Random(7)
    patient_ids = []
    for site in ("hospital_a", "hospital_b", "hospital_c"):
        patient_ids += _write_site(root / "data" / site, site, 12, rng)
    workdir = root / "work"
    # Each site's own policy: a budget of twice phase A's epsilon (the run asks for exactly that), and it answers
    # the coordinator's evaluation requests (closed by default).
    nodes = [{"data-dir": str(root / "data" / s), "site-id": s, "site-dir": str(workdir / "sites" / s),
              "policy-epsilon-total": 2 * EPSILON, "policy-answer-evaluate": True}
             for s in ("hospital_a", "hospital_b", "hospital_c")]
    torch.manual_seed(0)
    grid, context = run_in_process(server_app, client_app, nodes, {**RUN_CONFIG, "workdir": str(workdir)})
    summary = json.loads(context.state["phase-a-result"]["json"])
    return {"grid": grid, "summary": summary, "workdir": workdir, "patient_ids": patient_ids, "nodes": nodes}


RUN_MODEL = PhaseAConfig(dim=16, max_history=16)  # the model RUN_CONFIG asks for


def test_the_model_travels_as_one_array_and_comes_back_whole_or_not_at_all():
    from flwr.app import Array, ArrayRecord

    weights = build_model(load_profile("obgyn"), dim=16, max_history=16).state_dict()
    packed = pack_model(weights, RUN_MODEL)
    assert list(packed) == [MODEL_ARRAY] and packed[MODEL_ARRAY].shape == (sum(t.numel() for t in weights.values()),)
    back = unpack_model(packed, RUN_MODEL)
    assert list(back) == list(weights) and all(torch.equal(back[k], weights[k]) for k in weights)
    with pytest.raises(ValueError, match="values for this run's config"):  # another profile's model
        unpack_model(packed, PhaseAConfig(profile="chronic", dim=16, max_history=16))
    with pytest.raises(ValueError, match="one array"):  # the tensors by name, as Flower would send a state dict
        unpack_model(ArrayRecord(weights), RUN_MODEL)
    with pytest.raises(ValueError, match="values for this run's config"):
        unpack_model(ArrayRecord({MODEL_ARRAY: Array(np.zeros((2, 3), dtype=np.float32))}), RUN_MODEL)
    reordered = dict(reversed(list(weights.items())))  # same tensors, another order: never packed out of place
    with pytest.raises(ValueError, match="not phase A's model"):
        pack_model(reordered, RUN_MODEL)
    with pytest.raises(ValueError, match="not phase A's model"):
        pack_model(weights, PhaseAConfig(profile="chronic", dim=16, max_history=16))


def test_model_accepts_points_or_patients_and_embeds_on_the_unit_sphere():
    model = build_model(50, dim=16, max_history=8)
    history = torch.randint(1, 40, (3, 5, 8, 4)) % torch.tensor([300, 9, 13, 6])
    point = torch.zeros((3, 5, 5), dtype=torch.long)
    assert model(history, point).shape == (3, 5, 50)
    assert model(history[0], point[0]).shape == (5, 50)
    norms = model.embed(history[0], point[0]).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(5), atol=1e-5)


def test_training_runs_and_sends_only_weight_updates(federated_run):
    grid, summary = federated_run["grid"], federated_run["summary"]
    assert summary["sites"] == 3 and summary["sites_stored"] == 3
    model_keys = set(build_model(load_profile("obgyn"), dim=16, max_history=16).state_dict())
    patient_ids = federated_run["patient_ids"]
    # no train-loss (an exact figure of the site's patients), and the FedAvg weight is 1, not the patient count
    allowed_metrics = {"num-examples", "local-steps", "epsilon", "noise-multiplier", "recall@5",
                       "ndcg@5", "micro_auroc", "risk_auroc", "stored"}
    kinds = set()
    for node, reply in grid.outbox:
        assert not reply.has_error(), reply.error
        kind = reply.metadata.message_type
        kinds.add(kind)
        content = reply.content
        assert not content.config_records, "nothing but weights and aggregate metrics may leave a site"
        for record in content.metric_records.values():
            assert set(record) <= allowed_metrics
            assert all(isinstance(v, (int, float)) for v in record.values()), "metrics are scalars, not per-patient lists"
        if kind == "train":
            assert content["metrics"]["num-examples"] == 1.0
            assert list(content.array_records) == ["arrays"]
            arrays = content["arrays"]
            assert list(arrays) == [MODEL_ARRAY]  # one flat array, exactly the model's parameters: nothing extra
            state = unpack_model(arrays, RUN_MODEL)
            assert set(state) == model_keys  # no `_module.` (Opacus's wrapper) either
            reference = build_model(load_profile("obgyn"), dim=16, max_history=16).state_dict()
            assert all(state[k].shape == reference[k].shape for k in reference)
        else:
            assert not content.array_records, f"{kind} replies carry no arrays (no embeddings, no predictions)"
        text = repr({k: dict(v) for k, v in content.metric_records.items()})
        assert not any(pid in text for pid in patient_ids)
    assert kinds == {"train", "evaluate", "query.store_model"}


def test_ledger_holds_one_entry_per_local_round_with_the_parameters_used(federated_run):
    for node in federated_run["nodes"]:
        site_dir = Path(node["site-dir"])
        replay = verify_ledger(site_dir / "ledger" / "privacy_ledger.jsonl")
        assert replay.ok, replay.problems
        releases = [e for e in replay.entries if e["kind"] == "release" and e["phase"] == PHASE]
        assert [e["round"] for e in releases] == list(range(1, ROUNDS + 1))
        plan = json.loads(next((site_dir / "phase_a").glob("plan-*.json")).read_text())
        batches = 2  # the public default rate 0.5: two Poisson batches an epoch, whatever the site's size
        for entry in releases:
            assert entry["population_size"] is None  # the site's patient count is not public by default
            mech = entry["mechanism"]
            assert mech["type"] == "dp-sgd" and mech["privacy_unit"] == "patient-in-site"
            assert mech["noise_multiplier"] == plan["noise_multiplier"]
            assert mech["sampling_rate"] == pytest.approx(1 / batches)
            assert mech["steps"] == RUN_CONFIG["local-epochs"] * batches
            assert entry["extra"]["opacus_rdp_epsilon"] > 0
        assert releases[-1]["phase_epsilon"] <= EPSILON + 1e-9


def test_reported_epsilon_equals_dp_accounting_for_those_parameters(federated_run):
    site_dir = Path(federated_run["nodes"][0]["site-dir"])
    replay = verify_ledger(site_dir / "ledger" / "privacy_ledger.jsonl")
    releases = [e for e in replay.entries if e["kind"] == "release" and e["phase"] == PHASE]
    interval = replay.genesis["accountant_settings"]["pld_value_discretization_interval"]
    pld = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=interval)
    rdp = RdpAccountant()
    for entry in releases:
        m = entry["mechanism"]
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(m["sampling_rate"], dp_accounting.GaussianDpEvent(m["noise_multiplier"])),
            m["steps"])
        pld.compose(event)
        rdp.compose(event)
        assert entry["phase_epsilon"] == pytest.approx(pld.get_epsilon(DELTA), rel=1e-9)
        # phase A is all this site has released, so the site's running RDP figure is phase A's too
        assert entry["epsilon"] == pytest.approx(entry["phase_epsilon"], rel=1e-9)
        assert entry["epsilon_rdp"] == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    # the train reply's epsilon is the one in the ledger, and the budget was used, not exceeded
    assert EPSILON * 0.8 < releases[-1]["phase_epsilon"] <= EPSILON


def test_global_model_is_stored_with_the_ledger_entry_that_released_it(federated_run):
    for node in federated_run["nodes"]:
        site_dir = Path(node["site-dir"])
        model, encoder, manifest = load_global_model(site_dir)
        assert manifest["round"] == ROUNDS and manifest["private"]
        replay = verify_ledger(site_dir / "ledger" / "privacy_ledger.jsonl")
        released = replay.entries[manifest["ledger_release"]["seq"]]
        assert released["kind"] == "release" and released["round"] == ROUNDS
        assert released["signature"] == manifest["ledger_release"]["signature"]
        assert released["run_id"] == manifest["run_id"]


def _example_with_changes() -> Example:
    history = []
    for i, days in enumerate((84, 56, 28)):  # visits 12, 8 and 4 weeks ago; none in the last 4 weeks + today
        history += [HistoryItem("snomed:424619006", "encounter", days), HistoryItem("loinc:8480-6", "observation", days, 112 + 6 * i, "mm[Hg]"),
                    HistoryItem("loinc:8462-4", "observation", days, 72, "mm[Hg]"), HistoryItem("loinc:29463-7", "observation", days, 70 + 1.5 * i, "kg")]
    history += [HistoryItem("snomed:424619006", "encounter", 0), HistoryItem("loinc:8480-6", "observation", 0, 146, "mm[Hg]"),
                HistoryItem("loinc:8462-4", "observation", 0, 93, "mm[Hg]"), HistoryItem("snomed:398254007", "condition", 0)]
    return Example("p", datetime(2025, 1, 1, tzinfo=timezone.utc), "snomed:424619006", history, [], [], "test",
                   gestational_week=33.0, weeks_since_first_visit=22.0)


def test_self_features_name_predictions_and_trajectory_changes():
    profile = load_profile("obgyn")
    encoder = FeatureEncoder(profile, 16)
    model = build_model(profile, dim=16, max_history=16)
    features = self_informed_features(model, encoder, _example_with_changes(), k=5)
    assert len(features.predictions) == 5
    assert all(p.name == profile.name_of(p.concept) and 0 <= p.probability <= 1 for p in features.predictions)
    kinds = {c.kind for c in features.changes}
    assert kinds == {"rising_blood_pressure", "weight_change", "missed_visit", "new_condition"}
    text = " ".join(c.text for c in features.changes)
    assert "146/93" in text and "pre-eclampsia" in text and "2025" not in text


def test_the_recurrence_weight_of_each_concept_she_had_is_read_at_her_last_gap_and_learns_only_there():
    """The model looks up only the history's own concepts (not every concept, masked): the logits and the
    gradient are those of the definition, written out here concept by concept."""
    from pmlm.common.model import GAP_BUCKETS

    torch.manual_seed(3)
    n = 30
    model = build_model(n, dim=8, max_history=6)
    with torch.no_grad():
        model.recurrence.weight.normal_()
    # Rows: profile concepts with gap buckets, one outside the profile (token > n), padding (0), one without a gap.
    history = torch.tensor([[[5, 1, 3, 1], [12, 2, 1, 2], [n + 4, 1, 2, 1], [7, 1, 0, 1], [0, 0, 0, 0],
                             [30, 3, GAP_BUCKETS - 1, 1]],
                            [[1, 1, 2, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    point = torch.zeros((2, 5), dtype=torch.long)
    expected = torch.zeros((2, n))
    for b in range(2):
        for token, _, gap, _ in history[b].tolist():
            if 1 <= token <= n and gap > 0:
                expected[b, token - 1] = model.recurrence.weight[(token - 1) * GAP_BUCKETS + gap, 0]
    base = build_model(n, dim=8, max_history=6)
    got = model(history, point) - base(history, point)  # the same prior and zero tables but for recurrence
    assert torch.allclose(got, expected, atol=1e-6)
    model(history, point).sum().backward()
    learned = set(torch.nonzero(model.recurrence.weight.grad[:, 0]).flatten().tolist())
    assert learned == {4 * GAP_BUCKETS + 3, 11 * GAP_BUCKETS + 1, 29 * GAP_BUCKETS + GAP_BUCKETS - 1, 0 * GAP_BUCKETS + 2}


def test_one_dataset_item_is_one_patient():
    profile = load_profile("obgyn")
    encoder = FeatureEncoder(profile, 16)
    examples = [Example(pid, datetime(2025, 1, 1, tzinfo=timezone.utc), "snomed:424619006",
                        [HistoryItem("snomed:225158009", "procedure", d)], ["snomed:424619006"], [], "train",
                        weeks_since_first_visit=4.0)
                for pid in ("a", "b") for d in range(7)]
    dataset = PatientDataset(examples, encoder, points_per_patient=4)
    assert len(dataset) == 2
    history, point, targets, mask = dataset[0]
    assert history.shape == (4, 16, 4) and point.shape == (4, 5) and mask.sum() == 4
    assert np.isclose(targets.sum().item(), 4.0)


@pytest.fixture(scope="module")
def receive_only_run(tmp_path_factory):
    """hospital_c's operator receives phase A without training it (policy phase_a_train false)."""
    root = tmp_path_factory.mktemp("phase_a_receive_only")
    rng = random.Random(11)
    for site in ("hospital_a", "hospital_b", "hospital_c"):
        _write_site(root / "data" / site, site, 12, rng)
    workdir = root / "work"
    nodes = [{"data-dir": str(root / "data" / s), "site-id": s, "site-dir": str(workdir / "sites" / s),
              "policy-epsilon-total": 2 * EPSILON, **({"policy-phase-a-train": "false"} if s == "hospital_c" else {})}
             for s in ("hospital_a", "hospital_b", "hospital_c")]
    run = {**RUN_CONFIG, "evaluate-each-round": False, "workdir": str(workdir)}
    grid, context = run_in_process(server_app, client_app, nodes, run)
    return {"grid": grid, "summary": json.loads(context.state["phase-a-result"]["json"]), "nodes": nodes}


def test_a_receive_only_site_sends_no_weights_pays_nothing_and_keeps_the_average_of_the_others(receive_only_run):
    grid, summary, nodes = receive_only_run["grid"], receive_only_run["summary"], receive_only_run["nodes"]
    assert summary["sites_trained"] == ["hospital_a", "hospital_b"] and summary["sites_stored"] == 3
    site_of = {n["site-dir"]: n["site-id"] for n in nodes}
    train = [(node, reply) for node, reply in grid.outbox if reply.metadata.message_type == "train"]
    assert len(train) == 3 * ROUNDS
    last_round: dict[str, dict] = {}
    receipts = 0
    for node, reply in train:
        assert not reply.has_error(), reply.error
        metrics = dict(reply.content["metrics"])
        if "receive-only" in metrics:
            assert metrics == {"receive-only": 1.0} and not reply.content.array_records  # nothing of its records
            receipts += 1
        else:
            last_round[node] = unpack_model(reply.content["arrays"], RUN_MODEL)
    assert len(last_round) == 2
    # The final model every site keeps is the plain mean of the two trained updates of the last round.
    updates = list(last_round.values())
    for node in nodes:
        site_dir = Path(node["site-dir"])
        model, _, manifest = load_global_model(site_dir)
        assert manifest["trained_here"] is (node["site-id"] != "hospital_c")
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                assert torch.allclose(value, (updates[0][key] + updates[1][key]) / 2, atol=1e-6), key
    # The receiver's ledger holds no phase-A release; the others' hold one per round.
    for site_dir, site in site_of.items():
        path = Path(site_dir) / "ledger" / "privacy_ledger.jsonl"
        releases = [e for e in verify_ledger(path).entries if e.get("phase") == PHASE and e["kind"] == "release"] \
            if path.exists() else []
        assert len(releases) == (0 if site == "hospital_c" else ROUNDS), site
    assert receipts == ROUNDS


def test_phase_a_train_is_a_yes_or_no_in_the_sites_policy():
    from pmlm.client.site_policy import PolicyError, SitePolicy

    assert SitePolicy.from_dict({"phase_a_train": False}).phase_a_train is False
    assert SitePolicy().phase_a_train is True
    with pytest.raises(PolicyError, match="phase_a_train"):
        SitePolicy.from_dict({"phase_a_train": "sometimes"})


def test_examples_the_pipeline_already_read_are_not_parsed_again(tmp_path, monkeypatch):
    from pmlm.client import phase_a as site_phase_a

    examples = [_example_with_changes()]
    site_phase_a.keep_site_examples(tmp_path / "records", load_profile("obgyn"), examples)
    monkeypatch.setattr(site_phase_a, "load_site", lambda *a, **k: pytest.fail("records parsed twice"))
    assert site_phase_a.site_examples(tmp_path / "records", "h", load_profile("obgyn")) is examples


def test_a_long_lived_site_process_reads_its_records_again_only_when_they_change(tmp_path, monkeypatch):
    """A site worker lives across runs: it keeps its read of the records until the export changes."""
    import os

    from pmlm.client import phase_a as site_phase_a
    from tests.conftest import pregnant_woman_rows, write_events_csv

    born, start = datetime(1994, 3, 1), datetime(2025, 1, 10)
    rows = [*pregnant_woman_rows("p1", born, start), *pregnant_woman_rows("p2", born, start + timedelta(days=40))]
    records = write_events_csv(tmp_path / "records", rows)
    reads = []
    real = site_phase_a.load_site
    monkeypatch.setattr(site_phase_a, "load_site", lambda *a, **k: (reads.append(1), real(*a, **k))[1])
    profile = load_profile("obgyn")

    first = site_phase_a.site_examples(tmp_path / "records", "h", profile)
    assert site_phase_a.site_examples(tmp_path / "records", "h", profile) is first and len(reads) == 1
    write_events_csv(tmp_path / "records", [*rows, *pregnant_woman_rows("p3", born, start)])  # the next export
    again = site_phase_a.site_examples(tmp_path / "records", "h", profile)
    assert len(reads) == 2 and again is not first
    stat = records.stat()
    os.utime(records, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same size, rewritten later
    site_phase_a.site_examples(tmp_path / "records", "h", profile)
    assert len(reads) == 3
