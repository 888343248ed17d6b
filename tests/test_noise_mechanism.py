"""The noise drawn is the noise charged (issue #22): every DP release measured at its mechanism.

For each release a site makes (phase A's DP-SGD, phase B's centre, k-means and profile releases, phase C's
policy-gradient sum) these tests look at what was really added and compare it with the ledger entry that paid
for it: Opacus's noise multiplier and clipping norm, the spread of (released - exact) over many coordinates and
draws, and how far one patient can move the exact statistic. A release the budget refuses must never reach
training (phase A) or a noise draw (phases B and C). `tests/mutations.py` breaks each of these on purpose and
checks that a test here fails.

Odds of a false failure: every spread check is two tests on standardised noise z = noise / (sigma x
sensitivity) with the mean known to be 0: sum(z^2) against a two-sided chi-square interval at ALPHA, and
mean(z) against a two-sided normal interval at ALPHA. With ALPHA = 1e-6 and five such checks in this file (ten
tests), a correct implementation fails here by chance with probability below 1e-5 a run (the noise is the real
sources': the OS CSPRNG for phases B and C, torch seeded from `secrets` for phase A). Everything else is exact
arithmetic (up to float rounding).
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2, norm

from pmlm.client import phase_a as phase_a_module
from pmlm.client import phase_c as phase_c_module
from pmlm.client.examples import Example
from pmlm.client.phase_b import PhaseBSite
from pmlm.common.phase_b import PhaseBConfig
from pmlm.client.phase_a import SitePhaseA, site_examples
from pmlm.common.phase_a import PhaseAConfig, new_model
from pmlm.client.phase_c import SitePhaseC, rl_config
from pmlm.common.phase_c import PhaseCConfig
from pmlm.client.reward import ConceptMatcher
from pmlm.client.rl import LocalRL, Point
from pmlm.client.site_policy import SitePolicy
from pmlm.client.train import model_state
from pmlm.common.peer_profiles import initial_centroids
from pmlm.common.assemble.policy import PolicyState, PromptPolicy, trained_mask
from pmlm.common.privacy import BudgetExhausted, DpSgd, SiteLedger
from pmlm.common.profiles import load_profile
from pmlm.common.assemble.render import PatientContext
from pmlm.server.prototypes import run_prototypes

ALPHA = 1e-6
SITE = "hospital_n"
SNOMED, LOINC = "http://snomed.info/sct", "http://loinc.org"
POLICY = SitePolicy()  # the defaults every site starts from: 3 per patient, phase A at half of it
SMALL = dict(dim=16, max_history=16, points_per_patient=4, rounds=1, local_epochs=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Several torch threads on two shared cores made the small policy's steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the statistics ----------------------------------------------------------------------------------------

def assert_noise_matches(noise, std: float, what: str) -> None:
    """`noise` looks like independent N(0, std^2) draws: spread and mean within their ALPHA intervals."""
    z = np.asarray(noise, dtype=np.float64).ravel() / std
    n = z.size
    assert n >= 30, f"{what}: only {n} noise values, too few to say anything"
    ratio = float(np.mean(z ** 2))
    low, high = chi2.ppf(ALPHA / 2, n) / n, chi2.ppf(1 - ALPHA / 2, n) / n
    assert low <= ratio <= high, (f"{what}: measured noise std {np.sqrt(ratio) * std:.4g} over {n} values, the "
                                  f"ledger charges for {std:.4g} (std ratio {np.sqrt(ratio):.3f} outside "
                                  f"[{np.sqrt(low):.3f}, {np.sqrt(high):.3f}])")
    limit = norm.ppf(1 - ALPHA / 2) / np.sqrt(n)
    assert abs(float(z.mean())) <= limit, f"{what}: noise mean {z.mean() * std:.4g} is not 0 (limit {limit * std:.4g})"


def release_entries(ledger: SiteLedger, phase: str) -> list[dict]:
    return [e for e in ledger.entries() if e["kind"] == "release" and e["phase"] == phase]


# -- a small site of pregnant women --------------------------------------------------------------------------

def write_records(folder: Path, women: int, seed: int) -> Path:
    """Each woman: a pregnancy, then a visit every four weeks (heart auscultation, blood pressure, from the
    third visit fundal height), with a little randomness in dates and pressures."""
    rng = random.Random(seed)
    rows = []
    for w in range(women):
        pid = f"{SITE}-{w:03d}"
        start = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=rng.randrange(200))
        rows.append([pid, datetime(1988 + w % 12, 1 + w % 12, 3, tzinfo=timezone.utc).isoformat(), "patient", "",
                     "female", "", "", "", "", ""])
        rows.append([pid, start.isoformat(), "condition", SNOMED, "72892002", "Normal pregnancy", "", "",
                     (start + timedelta(days=266)).isoformat(), ""])
        for v in range(8):
            when = (start + timedelta(days=42 + 28 * v + rng.randrange(5))).isoformat()
            visit = ("424441002", "Prenatal initial visit") if v == 0 else ("424619006", "Prenatal visit")
            rows.append([pid, when, "encounter", SNOMED, *visit, "", "", "", "AMB"])
            rows.append([pid, when, "procedure", SNOMED, "225158009", "Auscultation of fetal heart", "", "", "", ""])
            if v >= 2:
                rows.append([pid, when, "procedure", SNOMED, "274804006", "Fundal height", "", "", "", ""])
            rows.append([pid, when, "observation", LOINC, "8480-6", "Systolic Blood Pressure",
                         str(108 + rng.randrange(25)), "mm[Hg]", "", ""])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "events.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["patient_id", "time", "kind", "system", "code", "display", "value", "unit", "end",
                      "encounter_class"])
        out.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("records"), women=30, seed=11)


def phase_a_site(site_dir: Path, records: Path, **overrides) -> SitePhaseA:
    return SitePhaseA(SITE, records, site_dir, PhaseAConfig(**{**SMALL, **overrides}), policy=POLICY)


# -- phase A: what Opacus really did -------------------------------------------------------------------------

@dataclass
class OpacusSpy:
    """Records, for every DP-SGD step: the per-patient gradients Opacus clipped and their clipped sum, the
    noise it added (grad after noise minus the clipped sum), its noise multiplier and clipping norm, and the
    sampling rate of its Poisson loader."""

    clipped: list = None
    noised: list = None
    loader_rates: list = None

    def install(self, monkeypatch) -> "OpacusSpy":
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers.optimizer import DPOptimizer

        self.clipped, self.noised, self.loader_rates = [], [], []
        real_clip, real_noise, real_loader = DPOptimizer.clip_and_accumulate, DPOptimizer.add_noise, DPDataLoader.__init__
        spy = self

        def clip_and_accumulate(optimizer):
            samples = [optimizer._get_flat_grad_sample(p).detach().double().clone() for p in optimizer.params]
            real_clip(optimizer)
            spy.clipped.append((samples, [p.summed_grad.detach().double().clone() for p in optimizer.params]))

        def add_noise(optimizer):
            real_noise(optimizer)
            noise = torch.cat([(p.grad - p.summed_grad.view_as(p)).detach().reshape(-1) for p in optimizer.params])
            spy.noised.append({"noise_multiplier": optimizer.noise_multiplier,
                               "max_grad_norm": optimizer.max_grad_norm, "noise": noise.double().numpy()})

        def loader_init(loader, *args, **kwargs):
            real_loader(loader, *args, **kwargs)
            spy.loader_rates.append(loader.batch_sampler.sample_rate)

        monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip_and_accumulate)
        monkeypatch.setattr(DPOptimizer, "add_noise", add_noise)
        monkeypatch.setattr(DPDataLoader, "__init__", loader_init)
        return self


def test_phase_a_opacus_adds_the_noise_and_clips_at_the_norm_its_ledger_entry_charges(tmp_path, records, monkeypatch):
    spy = OpacusSpy().install(monkeypatch)
    site = phase_a_site(tmp_path / "site", records)
    weights = model_state(new_model(site.cfg, site.profile))
    site.train_round(weights, 1, "run-a", {})

    (entry,) = release_entries(site.ledger("run-a"), "phase_a")
    mech = entry["mechanism"]
    assert mech["type"] == "dp-sgd" and entry["round"] == 1
    # Opacus ran exactly the mechanism the ledger prices: its multiplier, its clipping norm, its steps, its rate.
    assert len(spy.noised) == mech["steps"] and spy.loader_rates == [mech["sampling_rate"]]
    for step in spy.noised:
        assert step["noise_multiplier"] == mech["noise_multiplier"]
        assert step["max_grad_norm"] == mech["clipping_norm"]
    # What was added has the standard deviation the ledger charges for: sigma x clipping norm.
    noise = np.concatenate([step["noise"] for step in spy.noised])
    assert_noise_matches(noise, mech["noise_multiplier"] * mech["clipping_norm"], "phase A DP-SGD noise")

    # Each patient's gradient entered the sum scaled to at most the ledger's clipping norm: the clipped sum
    # Opacus formed equals the sum of the per-patient gradients, each clipped to that norm.
    clip, clipped_somebody = mech["clipping_norm"], False
    for samples, summed in spy.clipped:
        patients = samples[0].shape[0]
        if patients == 0:
            continue
        norms = torch.sqrt(sum((g.reshape(patients, -1) ** 2).sum(dim=1) for g in samples))
        clipped_somebody |= bool((norms > clip).any())
        factor = torch.clamp(clip / (norms + 1e-6), max=1.0)
        for g, total in zip(samples, summed):
            expected = torch.einsum("i,i...->...", factor, g)
            assert torch.allclose(total, expected, rtol=1e-4, atol=1e-6 * clip), \
                "Opacus's clipped sum is not the per-patient gradients clipped to the ledger's norm"
    assert clipped_somebody, "no patient's gradient exceeded the clipping norm: the check above proves nothing"


def test_phase_a_round_the_budget_refuses_is_never_trained(tmp_path, records, monkeypatch):
    site = phase_a_site(tmp_path / "site", records)
    weights = model_state(new_model(site.cfg, site.profile))
    trained = []
    real_train_local = phase_a_module.train_local

    def train_local(*args, **kwargs):
        trained.append(1)
        return real_train_local(*args, **kwargs)

    monkeypatch.setattr(phase_a_module, "train_local", train_local)
    # A plan far too noisy-light for the budget (the node's memory of a run; the ledger must still say no).
    q, steps = 0.5, 2
    state = {"run": "run-tight", "noise_multiplier": 0.05, "sampling_rate": q, "steps_per_round": steps,
             "rounds": 1, "patient_clip": site.cfg.patient_clip, "phase_epsilon_cap": 1.5, "opacus_history": []}
    with pytest.raises(BudgetExhausted):
        site.train_round(weights, 1, "run-tight", state)
    assert trained == [], "phase A trained a round its ledger refused"
    ledger = site.ledger("run-tight")
    assert [e["kind"] for e in ledger.entries()][-1] == "refusal" and not release_entries(ledger, "phase_a")
    # The same site trains once its plan fits (the spy above does see training when it happens).
    site.train_round(weights, 1, "run-fits", {})
    assert trained == [1] and len(release_entries(site.ledger("run-fits"), "phase_a")) == 1


# -- phase B: the three releases ----------------------------------------------------------------------------

CONCEPTS = ["snomed:271442007", "snomed:118001005", "snomed:398254007", "snomed:424619006", "snomed:5880005"]


def phase_b_examples(patients: int, rng: np.random.Generator, dim: int) -> tuple[list[Example], np.ndarray]:
    """A few points per patient, each with 1-3 events; one 'heavy' patient with 40 points whose whole
    contribution must be clipped down to the release's bound, and one 'twin' with 5 identical points (all
    in one prototype, so her clipped rows reach the bound there too)."""
    examples = []
    for i in range(patients):
        for _ in range(int(rng.integers(1, 4))):
            events = sorted(rng.choice(CONCEPTS, int(rng.integers(1, 4)), replace=False))
            examples.append(Example(f"p{i:03d}", None, "snomed:424619006", [], events, [], "train"))
    for _ in range(40):
        examples.append(Example("heavy", None, "snomed:424619006", [], list(CONCEPTS[:3]), [], "val"))
    embeddings = rng.standard_normal((len(examples), dim))
    for _ in range(5):
        examples.append(Example("twin", None, "snomed:424619006", [], [CONCEPTS[0]], [], "train"))
    twin = rng.standard_normal(dim)
    return examples, np.vstack([embeddings, np.tile(twin, (5, 1))])


def phase_b_ledger(site_dir: Path) -> SiteLedger:
    return SiteLedger(site_dir, SITE, POLICY.budget())


def test_phase_b_releases_carry_the_noise_their_entries_charge(tmp_path):
    """Centre, k-means and profile releases with the site's real noise source (the OS CSPRNG): per column
    group, (released - exact) / (sigma x sensitivity of its own entry) is standard normal; counts included."""
    rng = np.random.default_rng(3)
    dim, config = 16, PhaseBConfig(prototypes=12, rounds=3, min_count=5)
    examples, embeddings = phase_b_examples(80, rng, dim)
    caps = POLICY.run_caps(1.5, 0.0, POLICY.delta)
    site = PhaseBSite(phase_b_ledger(tmp_path / "b"), examples, embeddings, CONCEPTS, config, "run-b",
                      phase_cap=caps["phase_b"])
    stats, counts, kinds = [], [], []

    def collect(kind, centroids, round, centre):
        out = site.release(kind, centroids, round, centre)
        exact = site.stats(kind, centroids, centre)
        mech = out.entry["mechanism"]
        assert out.entry["extra"]["release"] == kind and out.entry["round"] == round
        z = (out.values - exact) / (mech["noise_multiplier"] * mech["l2_sensitivity"])
        stats.append(z[:, :-1].ravel())
        counts.append(z[:, -1])
        kinds.append(kind)
        return out.values, mech["noise_multiplier"] * mech["l2_sensitivity"]

    run_prototypes(collect, CONCEPTS, dim, 84, config)
    assert kinds == ["centre", "kmeans", "kmeans", "profile"]
    assert len(release_entries(site.ledger, "phase_b")) == config.releases
    assert_noise_matches(np.concatenate(stats), 1.0, "phase B statistics columns (standardised)")
    assert_noise_matches(np.concatenate(counts), 1.0, "phase B counts column (standardised)")
    assert_noise_matches(stats[-1], 1.0, "phase B profile histogram (standardised)")


def test_one_patient_moves_a_phase_b_release_by_at_most_its_entry_sensitivity(tmp_path):
    """Add/remove each patient in turn: the exact [statistics | counts] move by at most the L2 sensitivity the
    release's ledger entry states, and the heavy patient reaches it (so a smaller stated bound would show)."""
    rng = np.random.default_rng(4)
    dim, config = 8, PhaseBConfig(prototypes=4, rounds=2)
    examples, embeddings = phase_b_examples(10, rng, dim)
    centre, prototypes = 0.1 * initial_centroids(1, dim, 9)[0], initial_centroids(4, dim, 0)
    # 'spread': one point in each prototype, three events each; clipped, her rows reach the profile's bound
    examples += [Example("spread", None, "snomed:424619006", [], list(CONCEPTS[1:4]), [], "train")] * 4
    embeddings = np.vstack([embeddings, centre + prototypes])
    caps = POLICY.run_caps(1.5, 0.0, POLICY.delta)
    everyone = PhaseBSite(phase_b_ledger(tmp_path / "b"), examples, embeddings, CONCEPTS, config, "run-b",
                          phase_cap=caps["phase_b"])
    requests = {"centre": (initial_centroids(1, dim, 0), None), "kmeans": (prototypes, centre),
                "profile": (prototypes, centre)}
    for round, (kind, (centroids, at)) in enumerate(requests.items()):
        stated = everyone.release(kind, centroids, round, at).entry["mechanism"]["l2_sensitivity"]
        full = everyone.stats(kind, centroids, at)
        largest = {}
        for patient in sorted({ex.patient_id for ex in examples}):
            keep = [i for i, ex in enumerate(examples) if ex.patient_id != patient]
            without = PhaseBSite(None, [examples[i] for i in keep], embeddings[keep], CONCEPTS, config, "run-b")
            moved = float(np.linalg.norm(full - without.stats(kind, centroids, at)))
            assert moved <= stated * (1 + 1e-9), f"{kind}: patient {patient} moves the release by {moved:.4g} > {stated:.4g}"
            assert np.all(np.abs(full - without.stats(kind, centroids, at))[:, -1] <= 1 + 1e-9)  # <= 1 per count
            largest[patient] = moved
        assert max(largest.values()) >= 0.99 * stated, f"{kind}: the bound never binds ({largest})"


class SpyNormal:
    """A noise source that remembers being asked."""

    def __init__(self):
        self.calls = 0
        self.inner = np.random.default_rng(0)

    def normal(self, *args, **kwargs):
        self.calls += 1
        return self.inner.normal(*args, **kwargs)


def test_phase_b_release_the_budget_refuses_draws_no_noise(tmp_path):
    rng = np.random.default_rng(5)
    examples, embeddings = phase_b_examples(10, rng, 8)
    spy = SpyNormal()
    site = PhaseBSite(phase_b_ledger(tmp_path / "b"), examples, embeddings, CONCEPTS, PhaseBConfig(prototypes=2),
                      "run-b", rng=spy)
    site._sigma = 0.05  # far too little noise for the site's phase B share
    for kind in ("centre", "kmeans", "profile"):
        with pytest.raises(BudgetExhausted):
            site.release(kind, initial_centroids(1 if kind == "centre" else 2, 8, 0), 0, None)
    assert spy.calls == 0, "phase B drew noise for a release its ledger refused"
    kinds = [e["kind"] for e in site.ledger.entries()]
    assert kinds.count("refusal") == 3 and "release" not in kinds
    site._sigma = None  # calibrated: it fits, and the spy sees the draw
    site.release("centre", initial_centroids(1, 8, 0), 0, None)
    assert spy.calls == 1


# -- phase C: the policy-gradient sum --------------------------------------------------------------------------

@dataclass
class Answer:
    text: str
    cached: bool = False


class ListingLLM:
    """Stands in for the site's LLM: lists the prompt's bulleted items when asked for one bullet per event."""

    def chat(self, messages, **sampling):
        text = "\n".join(m["content"] for m in messages)
        if "one bullet per expected care event" not in text:
            return Answer("Rest and eat well.")
        return Answer("\n".join(f"- {item}" for item in re.findall(r"^- (.+)$", text, flags=re.M)))


def rl_points(n: int) -> list[Point]:
    rng = np.random.default_rng(6)
    out = []
    for i in range(n):
        ex = Example(f"c{i:02d}", None, "snomed:424619006", [], ["snomed:271442007", "snomed:424619006"], [], "train")
        ctx = PatientContext(predictions=[("fetal anatomy study", 0.8), ("prenatal visit", 0.9)])
        out.append(Point(ex, ctx, PolicyState(rng.standard_normal(8).astype(np.float32), top1_prob=0.9,
                                              history_length=40)))
    return out


def test_one_patient_moves_the_phase_c_sum_by_at_most_the_clip():
    """Her episodes added or removed change the clipped sum by at most the per-patient clip the release charges
    (and some patient reaches it: her raw gradient is far above the clip)."""
    profile = load_profile()
    config = rl_config(replace(PhaseCConfig(), trains="all"))  # every weight: the widest sum there is
    config = replace(config, clip=0.05)
    torch.manual_seed(0)
    rl = LocalRL(PromptPolicy(8), ListingLLM(), ConceptMatcher(profile), rl_points(8), config, seed=1)
    episodes = rl.run_episodes(8)
    everyone = rl.clipped_sum(episodes)
    raw = max(float(g.norm()) for g in rl.patient_gradients(episodes))
    assert raw > 2 * config.clip, "no patient's gradient exceeds the clip: the check below proves nothing"
    moved = {}
    for patient in sorted({e.patient_id for e in episodes}):
        without = rl.clipped_sum([e for e in episodes if e.patient_id != patient])
        moved[patient] = float(np.linalg.norm(everyone - without))
        assert moved[patient] <= config.clip * (1 + 1e-5), f"patient {patient} moves the sum by {moved[patient]:.4g}"
    assert max(moved.values()) >= 0.99 * config.clip


@pytest.fixture(scope="module")
def phase_c_ready(records, tmp_path_factory) -> tuple[Path, list[Example]]:
    """A site directory holding a phase-A global model (untrained: phase C only needs one to exist)."""
    site_dir = tmp_path_factory.mktemp("phase-c") / "site"
    site = phase_a_site(site_dir, records)
    site.store_global(model_state(new_model(site.cfg, site.profile)), 1, "run-a")
    return site_dir, site_examples(records, SITE, site.profile)


def phase_c_site(site_dir: Path, examples: list[Example], config: PhaseCConfig, run_id: str,
                 monkeypatch) -> SitePhaseC:
    monkeypatch.setattr(phase_c_module, "site_llm", lambda settings=None, site_dir=None: ListingLLM())
    caps = POLICY.run_caps(1.5, 0.0, POLICY.delta)
    return SitePhaseC(SITE, site_dir, examples, "obgyn", config, run_id, budget=POLICY.budget(),
                      phase_cap=caps["phase_c"])


def test_phase_c_rounds_add_the_noise_their_entries_charge(phase_c_ready, tmp_path, monkeypatch):
    """Phase C's real round (Poisson sample, episodes, clipped sum, noise): the entry's mechanism is the one the
    round ran, moved weights carry N(0, (sigma x clip)^2) noise, the others are sent as exact zeros."""
    import shutil

    site_dir = tmp_path / "site"
    shutil.copytree(phase_c_ready[0], site_dir)
    config = PhaseCConfig(rounds=4, sampling_rate=1.0, points_per_site=8)
    site = phase_c_site(site_dir, phase_c_ready[1], config, "run-c", monkeypatch)
    exact = []
    real_clipped_sum = LocalRL.clipped_sum
    monkeypatch.setattr(LocalRL, "clipped_sum", lambda rl, episodes: exact.append(real_clipped_sum(rl, episodes))
                        or exact[-1])
    policy = PromptPolicy(site.artifacts.model.cfg.dim)
    mask = trained_mask(policy, config.trains)
    noise = []
    for r in range(config.rounds):
        vector, entry, public = site.round(policy, r)
        mech = entry["mechanism"]
        assert DpSgd(**{k: v for k, v in mech.items() if k != "type"}) == site.mechanism(site.noise_multiplier())
        assert mech["clipping_norm"] == config.clip and mech["sampling_rate"] == config.sampling_rate
        assert public["noise-std"] == pytest.approx(mech["noise_multiplier"] * mech["clipping_norm"])
        assert np.all(vector[~mask] == 0), "weights the update does not move must leave as exact zeros"
        noise.append((vector - exact[-1])[mask] / (mech["noise_multiplier"] * mech["clipping_norm"]))
    assert len(exact) == config.rounds and any(np.any(e != 0) for e in exact)  # the rounds had signal
    assert_noise_matches(np.concatenate(noise), 1.0, "phase C update noise (standardised)")


def test_phase_c_round_the_budget_refuses_draws_no_noise(phase_c_ready, tmp_path, monkeypatch):
    import shutil

    site_dir = tmp_path / "site"
    shutil.copytree(phase_c_ready[0], site_dir)
    site = phase_c_site(site_dir, phase_c_ready[1], PhaseCConfig(sampling_rate=1.0, points_per_site=4), "run-c",
                        monkeypatch)
    site.rng = spy = SpyNormal()
    site.sigma = 0.05  # far too little noise for the site's phase C share
    policy = PromptPolicy(site.artifacts.model.cfg.dim)
    with pytest.raises(BudgetExhausted):
        site.round(policy, 0)
    assert spy.calls == 0, "phase C drew noise for a release its ledger refused"
    assert [e["kind"] for e in site.ledger.entries()][-1] == "refusal" and not release_entries(site.ledger, "phase_c")
    site.sigma = None  # calibrated: it fits, and the spy sees the draw
    site.round(policy, 0)
    assert spy.calls == 1
