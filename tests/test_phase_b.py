"""Phase B: DP prototypes and peer profiles — only noisy aggregates leave a site, every release is charged."""

import numpy as np
import pytest

from pmlm.client.examples import Example
from pmlm.client.peers import PhaseBConfig, PhaseBSite, kmeans_sensitivity, kmeans_stats, one_example_per_patient
from pmlm.common.peer_profiles import PeerProfiles, honest_count, honest_percent, initial_centroids, peer_facts
from pmlm.common.privacy import BudgetConfig, BudgetExhausted, SiteLedger
from pmlm.common.profiles import load_profile
from pmlm.server.prototypes import build_profiles, collect_from, run_prototypes

BUDGET = BudgetConfig(8.0, 1e-5, {"phase_a": 0.4, "phase_b": 0.3, "phase_c": 0.3})
CONCEPTS = ["snomed:271442007", "snomed:118001005", "snomed:398254007", "snomed:424619006", "snomed:5880005"]


def _examples(n, rng, prefix):
    out = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        out.append(Example(f"{prefix}{i}", None, "snomed:424619006", [], sorted(rng.choice(CONCEPTS, k, replace=False)),
                           [], "train"))
    return out


def _site(tmp_path, name, n, rng, config, dim=8):
    ledger = SiteLedger(tmp_path / name, name, BUDGET)
    examples = _examples(n, rng, name)
    embeddings = rng.standard_normal((n, dim))
    return PhaseBSite(ledger, examples, embeddings, CONCEPTS, config, run_id="run-1",
                      rng=np.random.default_rng(1))


def test_initial_prototypes_use_no_patient_data():
    a = initial_centroids(6, 16, seed=3)
    assert np.allclose(a, initial_centroids(6, 16, seed=3))
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0)


def test_releases_are_aggregates_charged_once_each_and_small_sites_get_the_same_noise(tmp_path):
    rng = np.random.default_rng(0)
    config = PhaseBConfig(prototypes=4, rounds=2, min_count=5)
    big = _site(tmp_path, "big", 120, rng, config)
    small = _site(tmp_path, "small", 5, rng, config)
    sent = []

    class Recording:
        def __init__(self, site):
            self.site = site

        def kmeans_round(self, c, r):
            out = self.site.kmeans_round(c, r)
            sent.append((self.site.ledger.site_id, out))
            return out

        def profile_release(self, c):
            out = self.site.profile_release(c)
            sent.append((self.site.ledger.site_id, out))
            return out

    profiles = run_prototypes(collect_from([Recording(big), Recording(small)]), CONCEPTS, 8, 84, config)
    assert isinstance(profiles, PeerProfiles)
    for site_id, out in sent:
        # Only (prototypes x statistics+count) arrays leave: no row per patient, no ids.
        assert out.values.shape[0] == config.prototypes
        assert out.values.shape[1] in (8 + 1, len(CONCEPTS) + 1)
        assert "patient" not in str(out.entry.get("extra", ""))
    for site in (big, small):
        releases = [e for e in site.ledger.entries() if e.get("kind") == "release"]
        assert len(releases) == config.releases  # one ledger entry per release
    # The small site is clipped and noised exactly like the big one.
    mech = lambda s: [e["mechanism"] for e in s.ledger.entries() if e.get("kind") == "release"]  # noqa: E731
    assert mech(big) == mech(small)
    assert mech(small)[0]["l2_sensitivity"] == pytest.approx(kmeans_sensitivity())
    # Its 5 patients' exact counts are hidden under noise of the calibrated scale.
    exact = kmeans_stats(small.embeddings, initial_centroids(4, 8, 0))[1]
    noisy = [out for sid, out in sent if sid == "small"][0].values[:, -1]
    assert not np.allclose(noisy, exact)


def test_budget_refusal_draws_no_noise(tmp_path):
    rng = np.random.default_rng(0)
    tight = BudgetConfig(0.05, 1e-5, {"phase_b": 1.0})
    ledger = SiteLedger(tmp_path / "t", "t", tight)
    site = PhaseBSite(ledger, _examples(10, rng, "t"), rng.standard_normal((10, 8)), CONCEPTS,
                      PhaseBConfig(prototypes=2, rounds=1), run_id="r", rng=np.random.default_rng(0))
    site._sigma = 0.5  # far too little noise for epsilon 0.05
    state = site.rng.bit_generator.state
    with pytest.raises(BudgetExhausted):
        site.kmeans_round(initial_centroids(2, 8, 0), 0)
    assert site.rng.bit_generator.state == state  # no noise was drawn
    assert [e.get("kind") for e in ledger.entries()][-1] == "refusal"


def test_suppression_and_honest_facts():
    profile = load_profile("obgyn")
    centroids = initial_centroids(3, 4, 0)
    hist = np.array([[200, 100, 8, 340, 0], [2, 1, 0, 3, 0], [30, 20, 1, 50, 5]], float)
    counts = np.array([340.0, 4.0, 50.0])
    total = np.concatenate([hist, counts[:, None]], axis=1)
    prof = build_profiles(centroids, total, noise_std=6.0, concepts=CONCEPTS, horizon_days=84, min_count=20)
    assert prof.suppressed.tolist() == [False, True, False]
    assert np.all(prof.rates[1] == 0)
    w = prof.weights(centroids[1])
    assert w[1] == 0 and w.sum() == pytest.approx(1.0)
    facts = peer_facts(prof, centroids[0], profile)
    text = " ".join(facts)
    assert facts[0].startswith("Among about ") and "similar patients" in facts[0]
    assert "fetal anatomy study within 12 weeks" in text
    assert "pre-eclampsia" in text  # a risk, phrased as an outcome
    assert not any(ch in text for ch in (".1%", ".2%", ".5%"))  # no false precision
    assert honest_count(343.0, 6.0) == "about 340"
    assert honest_percent(0.587, 340, 6.0) == "about 60%"
    assert honest_percent(0.587, 30, 30.0) in ("about 50%", "about 75%")  # coarse when noise dominates


def test_one_example_per_patient_is_seeded_and_skips_test_split():
    rng = np.random.default_rng(0)
    exs = _examples(6, rng, "p") + _examples(6, rng, "p")
    exs[0].split = "test"
    chosen = one_example_per_patient(exs, seed=1)
    assert len({e.patient_id for e in chosen}) == len(chosen) == 6
    assert chosen == one_example_per_patient(exs, seed=1)
    assert all(e.split != "test" for e in chosen)
