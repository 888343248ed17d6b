"""Phase B: DP prototypes and peer profiles — only noisy aggregates leave a site, every release is charged."""

import numpy as np
import pytest

from pmlm.client.examples import Example
from pmlm.client.phase_b import PhaseBSite, kmeans_sensitivity, profile_sensitivity
from pmlm.common.phase_b import PhaseBConfig
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

        def release(self, kind, c, r, centre):
            out = self.site.release(kind, c, r, centre)
            sent.append((self.site.ledger.site_id, out))
            return out

    profiles = run_prototypes(collect_from([Recording(big), Recording(small)]), CONCEPTS, 8, 84, config)
    assert isinstance(profiles, PeerProfiles)
    for site_id, out in sent:
        # Only (prototypes x statistics+count) arrays leave: no row per patient, no ids.
        assert out.values.shape[0] in (1, config.prototypes)  # the centre round has one row
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
    exact = small.stats("centre", initial_centroids(1, 8, 0), np.zeros(8))[:, -1]
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
        site.release("kmeans", initial_centroids(2, 8, 0), 0, None)
    assert site.rng.bit_generator.state == state  # no noise was drawn
    assert [e.get("kind") for e in ledger.entries()][-1] == "refusal"


def test_suppression_and_honest_facts():
    profile = load_profile("obgyn")
    centroids = initial_centroids(3, 4, 0)
    hist = np.array([[200, 100, 40, 340, 9], [2, 1, 0, 3, 0], [30, 20, 1, 50, 5]], float)
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
    # 9 patients is within noise of zero at noise std 6 (2.33 stds needed over 5 concepts): not stated.
    assert profile.name_of(CONCEPTS[4]) not in text
    assert not any(ch in text for ch in (".1%", ".2%", ".5%"))  # no false precision
    assert honest_count(343.0, 6.0) == "about 340"
    assert honest_percent(0.587, 340, 6.0) == "about 60%"
    assert honest_percent(0.587, 30, 30.0) in ("about 50%", "about 75%")  # coarse when noise dominates
    # When the noise outweighs every cell (a small budget), the profile states nothing rather than noise.
    noisy = build_profiles(centroids, total, noise_std=150.0, concepts=CONCEPTS, horizon_days=84, min_count=20)
    noisy.suppressed[:] = [False, True, True]
    assert peer_facts(noisy, centroids[0], profile) == []


def _points(patient, n, rng, dim, concepts=CONCEPTS, split="train"):
    """`n` prediction points of one patient, each with 1-3 random events."""
    return [Example(patient, None, "snomed:424619006", [], sorted(rng.choice(concepts, int(rng.integers(1, 4)),
                                                                             replace=False)), [], split)
            for _ in range(n)]


def test_a_patient_is_clipped_as_a_whole_however_many_points_she_has():
    rng = np.random.default_rng(5)
    config = PhaseBConfig(prototypes=4, max_targets=12)
    others = [ex for i in range(12) for ex in _points(f"p{i}", int(rng.integers(1, 4)), rng, 8)]
    heavy = _points("heavy", 40, rng, 8)
    emb_others, emb_heavy = rng.standard_normal((len(others), 8)), rng.standard_normal((40, 8))
    with_her = PhaseBSite(None, others + heavy, np.vstack([emb_others, emb_heavy]), CONCEPTS, config, "r")
    without = PhaseBSite(None, others, emb_others, CONCEPTS, config, "r")
    centroids, centre = initial_centroids(4, 8, 0), 0.1 * initial_centroids(1, 8, 1)[0]
    for kind, bound in (("kmeans", kmeans_sensitivity()), ("profile", profile_sensitivity(12))):
        her = with_her.stats(kind, centroids, centre) - without.stats(kind, centroids, centre)
        assert np.linalg.norm(her) <= bound + 1e-9  # the sensitivity the noise is calibrated to
        assert her[:, -1].max() <= 1 + 1e-9 and her[:, -1].sum() > 1  # <= 1 per prototype, informs several
    # One point with few events passes unscaled: a count of 1 and a 1 for each of her events.
    single = PhaseBSite(None, heavy[:1], emb_heavy[:1], CONCEPTS, config, "r")
    row = single.stats("profile", centroids, centre).sum(axis=0)
    assert row[-1] == pytest.approx(1.0) and sorted(np.flatnonzero(row[:-1])) == sorted(
        CONCEPTS.index(c) for c in heavy[0].targets) and np.allclose(row[:-1][row[:-1] > 0], 1.0)


def test_prototypes_separate_patients_that_share_most_of_their_direction(tmp_path):
    """Real embeddings lie in a narrow cone: on the raw sphere every public-seed prototype but one would
    win nobody. Seen from the consortium's centre, two groups 0.3 apart are told apart."""
    rng = np.random.default_rng(2)
    dim, common, side = 32, initial_centroids(1, 32, 7)[0], initial_centroids(1, 32, 8)[0]
    config = PhaseBConfig(prototypes=4, rounds=2, min_count=5)
    budget = BudgetConfig(4.0, 1e-5, {"phase_b": 1.0})  # modest noise: this is about geometry
    sites = []
    for s in range(2):
        examples, embeddings = [], []
        for i in range(120):
            group = i % 2
            event = CONCEPTS[0] if group else CONCEPTS[1]
            examples.append(Example(f"s{s}p{i}", None, "snomed:424619006", [], [event], [], "train"))
            embeddings.append(common + 0.3 * (1 if group else -1) * side + 0.02 * rng.standard_normal(dim))
        sites.append(PhaseBSite(SiteLedger(tmp_path / f"s{s}", f"s{s}", budget), examples, np.array(embeddings),
                                CONCEPTS, config, "run", rng=np.random.default_rng(s)))
    profiles = run_prototypes(collect_from(sites), CONCEPTS, dim, 84, config)
    assert np.linalg.norm(profiles.centre - common / np.linalg.norm(common + 0.3 * side)) < 0.2
    assert profiles.ranking(common + 0.3 * side, 1) == [CONCEPTS[0]]
    assert profiles.ranking(common - 0.3 * side, 1) == [CONCEPTS[1]]
    for site in sites:  # the centre round, one k-means round, the profile: one ledger entry each
        assert [e["extra"]["release"] for e in site.ledger.entries() if e.get("kind") == "release"] == [
            "centre", "kmeans", "profile"]


def test_thin_prototypes_lean_on_the_consortium_and_noise_level_counts_are_suppressed():
    centroids = initial_centroids(3, 4, 0)
    hist = np.array([[20.0, 0.0], [0.0, 900.0], [0.0, 25.0]])
    total = np.concatenate([hist, np.array([[20.0], [1000.0], [35.0]])], axis=1)
    exact = build_profiles(centroids, total, noise_std=0.0, concepts=CONCEPTS[:2], horizon_days=84, min_count=20)
    assert not exact.suppressed.any()
    assert np.allclose(exact.rates, [[1.0, 0.0], [0.0, 0.9], [0.0, 25 / 35]])  # no noise: nothing pulled
    noisy = build_profiles(centroids, total, noise_std=20.0, concepts=CONCEPTS[:2], horizon_days=84, min_count=20)
    assert noisy.suppressed.tolist() == [True, False, True]  # 35 patients is within two noise stds of none
    thin = build_profiles(centroids, total, noise_std=10.0, concepts=CONCEPTS[:2], horizon_days=84, min_count=20)
    assert thin.suppressed.tolist() == [False, False, False]
    consortium = np.array([20.0, 925.0]) / 1055.0
    assert np.allclose(thin.rates[0], (hist[0] + 10.0 * consortium) / 30.0)  # a third from the consortium
    assert abs(thin.rates[1, 1] - 0.9) < 0.01  # a well-populated prototype keeps nearly its own rates
    assert np.all(noisy.rates[noisy.suppressed] == 0)


def test_the_centre_is_kept_with_the_profiles(tmp_path):
    centroids, centre = initial_centroids(2, 4, 0), np.array([0.5, 0.0, 0.0, 0.0])
    total = np.array([[40.0, 0.0, 50.0], [0.0, 40.0, 50.0]])
    profiles = build_profiles(centroids, total, 1.0, CONCEPTS[:2], 84, 20, centre)
    profiles.save(tmp_path / "peers")
    loaded = PeerProfiles.load(tmp_path / "peers")
    assert np.allclose(loaded.centre, centre)
    for embedding in ([1.0, 0.2, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0]):
        assert np.allclose(loaded.weights(np.array(embedding)), profiles.weights(np.array(embedding)))
