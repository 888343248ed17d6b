"""On-site adaptation of the recommender (client/adapt.py): chosen on the site's validation split, stored only at
the site, never in a Flower reply, never charged; the loader's fallback; the per-site table's patient bootstrap."""

from __future__ import annotations

import csv
import hashlib
import random
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from pmlm.client.adapt import (
    BLEND,
    CONSORTIUM,
    FINE_TUNED,
    AdaptSettings,
    adapt_recommender,
    read_adaptation,
    site_recommender,
)
from pmlm.client.client_app import app as client_app
from pmlm.client.egress import SPOOL_ENV, fields_outside_public_list, read_egress_log
from pmlm.client.examples import Example, HistoryItem
from pmlm.client.phase_a import SitePhaseA, load_global_model
from pmlm.common.metrics import patient_bootstrap, percentile_interval
from pmlm.common.phase_a import PhaseAConfig, new_model, pack_model
from pmlm.common.profiles import load_profile
from pmlm.common.site_layout import LEDGER_PATH, SITE_RECOMMENDER_DIR
from pmlm.pipeline.site_recommenders import site_table

SNOMED = "http://snomed.info/sct"
PROFILE = load_profile("obgyn")
CFG = PhaseAConfig(dim=16, max_history=16, points_per_patient=4)
FAST = AdaptSettings(epochs=4, batch_size=10, points_per_patient=4, min_val_points=4)


# -- a site's consortium model and examples built in memory --------------------------------------------------


def _examples(split: str, targets: list[str], patients: int, points: int = 3, prefix: str = "") -> list[Example]:
    visit = "snomed:424619006"  # prenatal visit: a prediction point
    out = []
    for p in range(patients):
        for i in range(points):
            history = [HistoryItem(visit, "encounter", 28.0 * j) for j in range(i + 1)]
            out.append(Example(f"{prefix}{split}-{p:03d}", datetime(2025, 1, 1 + i, tzinfo=timezone.utc), visit,
                               history, sorted(targets), [], split, gestational_week=10.0 + 4 * i,
                               weeks_since_first_visit=4.0 * i))
    return out


def _site_with_consortium(site_dir: Path, favoured: list[str]) -> SitePhaseA:
    """A site whose stored consortium model ranks `favoured` first (through the real store_global)."""
    site = SitePhaseA("clinic", site_dir, site_dir, CFG, examples=[])
    model = new_model(CFG, PROFILE)
    with torch.no_grad():
        for concept in favoured:
            model.popularity.weight[0, PROFILE.index[concept]] = 1.0
    site.store_global(model.state_dict(), 1, "phase-a-test")
    return site


CONCEPTS = [c.id for c in PROFILE.concepts]
PATHWAY = [c.id for c in PROFILE.concepts if c.obgyn]  # the same public prior for all of them
CONSORTIUM_FAVOURS, SITE_SEES = PATHWAY[:5], PATHWAY[10:15]


def test_validation_that_prefers_the_consortium_model_keeps_it(tmp_path):
    # Training says one thing, validation (like the consortium) another: fine-tuning only hurts validation.
    _site_with_consortium(tmp_path, CONSORTIUM_FAVOURS)
    examples = _examples("train", SITE_SEES, 30) + _examples("val", CONSORTIUM_FAVOURS, 6)
    result = adapt_recommender(tmp_path, examples, FAST)
    assert result.choice == CONSORTIUM and result.blend == 0.0 and result.epochs == 0
    assert result.validation[CONSORTIUM]["recall@5"] == 1.0
    assert max(v["recall@5"] for k, v in result.validation.items() if k.startswith("epoch")) < 1.0
    assert "preferred the consortium" in result.reason
    manifest = read_adaptation(tmp_path)
    assert manifest["choice"] == CONSORTIUM and manifest["model_file"] is None
    model, _, used = site_recommender(tmp_path)
    assert used["site_only"] is False
    consortium, _, _ = load_global_model(tmp_path)
    assert all(torch.equal(model.state_dict()[k], consortium.state_dict()[k]) for k in consortium.state_dict())


def test_validation_that_prefers_the_site_gets_the_adapted_model_and_the_loader_follows_the_consortium(tmp_path):
    site = _site_with_consortium(tmp_path, CONSORTIUM_FAVOURS)
    examples = _examples("train", SITE_SEES, 30) + _examples("val", SITE_SEES, 6)
    result = adapt_recommender(tmp_path, examples, FAST)
    assert result.choice in (FINE_TUNED, BLEND) and result.blend > 0 and result.epochs >= 1
    assert result.path == tmp_path / SITE_RECOMMENDER_DIR / "manifest.json"
    model, encoder, used = site_recommender(tmp_path)
    assert used["site_only"] is True and used["adapted_from"]["model_sha256"] == result.adapted_from
    history, point, _ = encoder.encode(examples[-1:])
    top = torch.topk(model(history, point)[0], 5).indices.tolist()
    assert {CONCEPTS[i] for i in top} == set(SITE_SEES)
    files = sorted(p.name for p in (tmp_path / SITE_RECOMMENDER_DIR).iterdir())
    assert files == ["manifest.json", used["model_file"]]  # no temporary or stale file left beside them
    # A damaged model file is not used (its hash no longer matches the manifest); the consortium model serves.
    model_path = tmp_path / SITE_RECOMMENDER_DIR / used["model_file"]
    blob = model_path.read_bytes()
    model_path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    assert site_recommender(tmp_path)[2]["site_only"] is False
    model_path.write_bytes(blob)
    # A new consortium model (the next run): the stored adaptation was made from another one, so it is not used.
    site.store_global(new_model(CFG, PROFILE).state_dict(), 2, "phase-a-next")
    assert site_recommender(tmp_path)[2]["site_only"] is False


def test_phase_as_encoded_patients_give_the_same_adaptation_as_encoding_them_again(tmp_path):
    from pmlm.client.features import FeatureEncoder, PatientDataset

    examples = _examples("train", SITE_SEES, 30) + _examples("val", SITE_SEES, 6)
    results = []
    for name, shared in (("again", False), ("shared", True)):
        _site_with_consortium(tmp_path / name, CONSORTIUM_FAVOURS)
        train_set = PatientDataset([e for e in examples if e.split == "train"],
                                   FeatureEncoder(PROFILE, CFG.max_history), CFG.points_per_patient, seed=99)
        results.append(adapt_recommender(tmp_path / name, examples, FAST, train_set=train_set if shared else None))
    assert results[0].validation == results[1].validation and results[0].choice == results[1].choice
    # Another encoding (a longer history) is not this model's: it is encoded again, not reused.
    other = PatientDataset(examples[:3], FeatureEncoder(PROFILE, CFG.max_history + 4), 4)
    _site_with_consortium(tmp_path / "other", CONSORTIUM_FAVOURS)
    assert adapt_recommender(tmp_path / "other", examples, FAST, train_set=other).validation == results[0].validation


def test_the_loader_falls_back_to_the_consortium_model_without_an_adaptation(tmp_path):
    _site_with_consortium(tmp_path, CONSORTIUM_FAVOURS)
    assert read_adaptation(tmp_path) is None
    model, _, used = site_recommender(tmp_path)
    consortium, _, manifest = load_global_model(tmp_path)
    assert used["site_only"] is False and used["model_sha256"] == manifest["model_sha256"]
    assert all(torch.equal(model.state_dict()[k], consortium.state_dict()[k]) for k in consortium.state_dict())


def test_too_few_validation_points_keep_the_consortium_model_without_training(tmp_path):
    _site_with_consortium(tmp_path, CONSORTIUM_FAVOURS)
    result = adapt_recommender(tmp_path, _examples("train", SITE_SEES, 5) + _examples("val", SITE_SEES, 1),
                               AdaptSettings(min_val_points=10))
    assert result.choice == CONSORTIUM and result.validation == {} and "too little" in result.reason
    assert site_recommender(tmp_path)[2]["site_only"] is False


# -- the real ClientApp: the artifact stays at the site ---------------------------------------------------------


def _write_site(folder: Path, site: str, women: int, rng: random.Random) -> None:
    """Pregnancies with prenatal visits every 4 weeks and the usual procedures (CSV event table)."""
    folder.mkdir(parents=True)
    rows = []
    for w in range(women):
        pid = f"{site}-{w:03d}-{rng.randrange(10**6):06d}"
        born = datetime(1990 + w % 10, 1 + w % 12, 1, tzinfo=timezone.utc)
        start = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=rng.randrange(300))
        rows.append([pid, born.isoformat(), "patient", "", "female", "", "", "", "", ""])
        rows.append([pid, start.isoformat(), "condition", SNOMED, "72892002", "Normal pregnancy", "", "",
                     (start + timedelta(days=266)).isoformat(), ""])
        for v in range(8):
            t = start + timedelta(days=42 + 28 * v)
            code = ("424441002", "Prenatal initial visit") if v == 0 else ("424619006", "Prenatal visit")
            rows.append([pid, t.isoformat(), "encounter", SNOMED, *code, "", "", "", "AMB"])
            rows.append([pid, t.isoformat(), "procedure", SNOMED, "225158009", "Auscultation of fetal heart",
                         "", "", "", ""])
            if v >= 2 + w % 3:
                rows.append([pid, t.isoformat(), "procedure", SNOMED, "274804006", "Fundal height", "", "", "", ""])
    with open(folder / "events.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "time", "kind", "system", "code", "display", "value", "unit", "end",
                         "encounter_class"])
        writer.writerows(rows)


def _store_request(weights: dict, cfg: PhaseAConfig) -> Message:
    """The coordinator's query.store_model as a SuperNode delivers it: the final weights and phase A's config."""
    meta = Metadata(run_id=7, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type="query.store_model")
    content = RecordDict({"arrays": pack_model(weights, cfg),
                          "config": ConfigRecord({**cfg.to_record(), "server-round": cfg.rounds})})
    return Message(content=content, metadata=meta)


def test_adaptation_after_phase_a_stays_at_the_site_and_is_never_charged(tmp_path, monkeypatch):
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "spool"))  # every message's raw bytes, as sent
    _write_site(tmp_path / "data", "clinic", 24, random.Random(3))
    site_dir = tmp_path / "site"
    node = {"data-dir": str(tmp_path / "data"), "site-id": "clinic", "site-dir": str(site_dir)}
    cfg = PhaseAConfig(rounds=3, dim=16, max_history=16, points_per_patient=4, run_name="phase-a-adapt-test")
    weights = new_model(cfg, PROFILE).state_dict()

    def store(**extra) -> Message:
        context = Context(run_id=7, node_id=1, node_config={**node, **extra}, state=RecordDict(), run_config={})
        return client_app(_store_request(weights, cfg), context)

    # The same final model stored twice: first with adaptation switched off, then with it (the default).
    without = store(**{"adapt-recommender": "false"})
    assert read_adaptation(site_dir) is None
    ledger_before = (site_dir / LEDGER_PATH).read_bytes()
    with_adaptation = store()
    decision = read_adaptation(site_dir)
    assert decision is not None and decision["site_only"] is True  # written under the site directory
    assert decision["choice"] != CONSORTIUM, decision  # these records do prefer their own model
    # What left is the same constant acknowledgement, byte for byte, and nothing outside the public list.
    assert with_adaptation.content.object_id == without.content.object_id
    entries, problems = read_egress_log(site_dir)
    assert problems == [] and fields_outside_public_list(entries) == []
    assert [e["message_type"] for e in entries] == ["query.store_model"] * 2
    assert entries[1]["summary"] == {"metrics": {"stored": 1.0}} == entries[0]["summary"]
    # Nothing was charged: the ledger is byte-identical.
    assert (site_dir / LEDGER_PATH).read_bytes() == ledger_before
    # Neither the adapted model's file nor its weights are in any message the site sent.
    spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool" / "clinic").glob("*.bin"))
    blob = (site_dir / SITE_RECOMMENDER_DIR / decision["model_file"]).read_bytes()
    adapted = site_recommender(site_dir)[0].state_dict()
    assert blob not in spooled and adapted["popularity.weight"].numpy().tobytes() not in spooled
    assert hashlib.sha256(blob).hexdigest().encode() not in spooled


# -- the per-site table's intervals -----------------------------------------------------------------------------


def test_the_bootstrap_resamples_patients_and_pairs_models_on_the_same_draws():
    # One patient with 50 identical points and 4 patients with one point each: 5 patients, not 54 points.
    values = np.array([1.0] * 50 + [0.0] * 4)
    patients = ["p0"] * 50 + ["p1", "p2", "p3", "p4"]
    replicates = patient_bootstrap(values, patients, resamples=500)
    assert replicates.shape == (500, 1)
    draws_without_p0 = np.isclose(replicates[:, 0], 0.0).mean()
    assert 0.2 < draws_without_p0 < 0.45  # (4/5)^5 = 0.33 of resamples miss her; a point bootstrap: ~0
    lo, hi = percentile_interval(replicates[:, 0])
    assert lo == 0.0 and hi > 0.95  # a bootstrap over points would give about [0.86, 0.98]
    # Two models scored on the same points share every draw: equal scores give a zero-width difference.
    both = patient_bootstrap(np.stack([values, values], axis=1), patients, resamples=200)
    assert percentile_interval(both[:, 0] - both[:, 1]) == [0.0, 0.0]


def test_the_site_table_has_intervals_pairs_and_survives_a_site_without_test_points():
    rng = np.random.default_rng(0)
    points = {"big": {m: (rng.random(40), rng.random(40)) for m in ("local_only", "federated_dp", "adapted")},
              "empty": {m: (np.zeros(0), np.zeros(0)) for m in ("local_only", "federated_dp", "adapted")}}
    points["big"]["adapted"] = (points["big"]["local_only"][0] + 0.1, points["big"]["local_only"][1])
    patients = {"big": [f"big/{i // 4}" for i in range(40)], "empty": []}
    table = site_table(points, patients, resamples=300)
    big = table["sites"]["big"]
    assert big["adapted"]["points"] == 40 and big["adapted"]["patients"] == 10
    lo, hi = big["adapted"]["recall@5_interval"]
    assert lo <= big["adapted"]["recall@5"] <= hi
    diff = big["adapted_minus_local_only"]
    assert diff["recall@5"] == pytest.approx(0.1) and diff["recall@5_interval"] == pytest.approx([0.1, 0.1])
    assert big["adapted_over_local_only"]["recall@5"] > 1.0
    empty = table["sites"]["empty"]
    assert empty["adapted"]["points"] == 0 and np.isnan(empty["adapted"]["recall@5"])
    assert table["pooled"]["adapted"]["points"] == 40
    assert table["pooled"]["adapted_minus_local_only"]["recall@5"] == pytest.approx(0.1)
