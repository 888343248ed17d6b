"""Phase C mechanics with a scripted stand-in LLM: learning moves the policy; only clipped, noised sums leave."""

import json
import re
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from pmlm.client.examples import Example
from pmlm.client.reward import ConceptMatcher
from pmlm.client.rl import LocalRL, Point, RLConfig, n_parameters
from pmlm.server.phase_c import apply_update
from pmlm.common.assemble.policy import FACTOR_NAMES, PolicyState, PromptPolicy, initial_bias, trained_mask
from pmlm.common.privacy import BudgetConfig, BudgetExhausted, GaussianRelease, SiteLedger
from pmlm.common.profiles import load_profile
from pmlm.common.assemble.render import INITIAL, PatientContext, render


@dataclass
class Answer:
    text: str
    cached: bool = False


class ListingLLM:
    """Stand-in for a unit test: repeats the bulleted items only when asked for one bullet per event."""

    def __init__(self):
        self.calls = 0

    def chat(self, messages, **sampling):
        self.calls += 1
        text = "\n".join(m["content"] for m in messages)
        if "one bullet per expected care event" not in text:
            return Answer("Rest and eat well.")
        items = re.findall(r"^- (.+)$", text, flags=re.M)
        return Answer("\n".join(f"- {i}" for i in items))


@pytest.fixture(scope="module")
def points():
    profile = load_profile()
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        targets = ["snomed:271442007", "snomed:424619006"]
        ex = Example(f"p{i}", None, "snomed:424619006", [], targets, [], "train")
        ctx = PatientContext(predictions=[("fetal anatomy study", 0.8), ("prenatal visit", 0.9)])
        state = PolicyState(rng.standard_normal(8).astype(np.float32), top1_prob=0.9, history_length=40)
        out.append(Point(ex, ctx, state))
    return profile, out


def test_policy_learns_the_format_that_makes_the_llm_list_her_events(points):
    profile, pts = points
    torch.manual_seed(0)
    policy = PromptPolicy(8)
    initial_bias(policy, INITIAL, strength=0.0)  # start uniform
    rl = LocalRL(policy, ListingLLM(), ConceptMatcher(profile), pts,
                 RLConfig(episodes_per_round=12, use_reward_model=False), seed=0)
    state = torch.as_tensor(pts[0].state.vector()).unsqueeze(0)
    before = torch.softmax(policy(state)[0]["format"], -1)[0, 0].item()
    rewards = []
    for _ in range(25):
        episodes = rl.run_episodes()
        rewards.append(np.mean([e.reward for e in episodes]))
        apply_update(policy, rl.clipped_sum(episodes), lr=1.0, scale=len(episodes))
    after = torch.softmax(policy(state)[0]["format"], -1)[0, 0].item()
    assert after > before + 0.2
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5])


def test_noisy_update_is_clipped_per_patient_and_charged(points, tmp_path):
    profile, pts = points
    policy = PromptPolicy(8)
    rl = LocalRL(policy, ListingLLM(), ConceptMatcher(profile), pts, RLConfig(use_reward_model=False, clip=0.5))
    ledger = SiteLedger(tmp_path / "s", "s", BudgetConfig(10.0, 1e-5, {"phase_c": 1.0}))
    episodes = rl.run_episodes(12)
    rng = np.random.default_rng(0)
    exact = rl.clipped_sum(episodes)
    assert np.linalg.norm(exact) <= 12 * 0.5 + 1e-6
    grads = rl.patient_gradients(episodes)
    assert max(float(g.norm()) for g in grads) > 0.5  # clipping really bound something
    vector, entry = rl.noisy_update(episodes, ledger, GaussianRelease(1.0, 0.5), rng=rng, round=0, run_id="r")
    assert vector.shape == (n_parameters(policy),)  # one vector for the whole site, nothing per patient
    noise = vector - exact
    assert 0.3 < np.std(noise) < 0.7  # N(0, (1.0 * 0.5)^2) per coordinate
    assert entry["mechanism"]["l2_sensitivity"] == 0.5 and entry["mechanism"]["noise_multiplier"] == 1.0
    # A release the budget cannot afford draws no noise and sends nothing.
    tight = SiteLedger(tmp_path / "t", "t", BudgetConfig(0.1, 1e-5, {"phase_c": 1.0}))
    state = rng.bit_generator.state
    with pytest.raises(BudgetExhausted):
        rl.noisy_update(episodes, tight, GaussianRelease(0.3, 0.5), rng=rng, round=0, run_id="r")
    assert rng.bit_generator.state == state


def test_a_noisy_update_with_shared_noise_draws_sigma_over_root_k(points, tmp_path):
    """Under a site's noise "distributed" policy the update carries σ/√k; its entry still prices σ."""
    from pmlm.common.privacy.shared_noise import NoiseSharing

    profile, pts = points
    rl = LocalRL(PromptPolicy(8), ListingLLM(), ConceptMatcher(profile), pts, RLConfig(use_reward_model=False, clip=0.5))
    ledger = SiteLedger(tmp_path / "s", "s", BudgetConfig(50.0, 1e-5, {"phase_c": 1.0}))
    vector, entry = rl.noisy_update([], ledger, GaussianRelease(1.0, 0.5), rng=np.random.default_rng(0), round=0,
                                    run_id="r", noise=NoiseSharing(4, 4, 4))
    moved = rl.mask.numpy() > 0
    assert np.std(vector[moved]) == pytest.approx(0.25, rel=0.15) and not vector[~moved].any()
    assert entry["mechanism"]["noise_multiplier"] == 1.0 and entry["noise"]["site_noise_multiplier"] == 0.5


def test_reward_model_screens_candidates(points):
    profile, pts = points
    policy = PromptPolicy(8)
    initial_bias(policy, INITIAL, strength=0.0)
    llm = ListingLLM()
    rl = LocalRL(policy, llm, ConceptMatcher(profile), pts,
                 RLConfig(episodes_per_round=12, warmup_episodes=36, candidates=16, explore=0.0, calls_every=3), seed=1)
    for _ in range(3):
        rl.run_episodes()
    assert rl.reward_model.fitted >= 36 and rl.screening
    before = llm.calls
    screened = rl.run_episodes()
    called = [e for e in screened if not e.predicted]
    predicted = [e for e in screened if e.predicted]
    # One point in three costs LLM calls, spent on the candidates the model ranks best; the rest are predicted.
    assert llm.calls - before == len(called) == 4 * 2
    assert len({e.patient_id for e in predicted}) == 8 and all(np.isnan(e.f1) for e in predicted)
    # After warm-up the model prefers the listing format, so screened episodes score higher than random ones.
    assert np.mean([e.reward for e in called]) > np.mean([e.reward for e in rl.log[:36]])
    # Predicted rewards teach the policy, but only answers the LLM gave are logged to fit the model on.
    assert not any(e.predicted for e in rl.log)
    assert max(float(g.norm()) for g in rl.patient_gradients(predicted)) > 0


def test_the_reward_model_takes_over_within_the_round_its_warm_up_ends(points):
    profile, pts = points
    llm = ListingLLM()
    torch.manual_seed(0)  # the policy's weights: the test must not depend on which tests ran before it
    rl = LocalRL(PromptPolicy(8), llm, ConceptMatcher(profile), pts,
                 RLConfig(episodes_per_round=12, warmup_episodes=6, calls_every=4), seed=2)
    episodes = rl.run_episodes()
    called = [e for e in episodes if not e.predicted]
    # Three points pay for the warm-up's 6 answers; of the other nine, the fourth and the eighth still pay (one in
    # four, counted from the last that paid), seven are predicted.
    # (The fixture's women share one context, so two of them may send the same request: llm_calls counts it once.)
    assert llm.calls == len(called) == (3 + 2) * 2 and rl.llm_calls <= llm.calls
    assert len({e.patient_id for e in episodes if e.predicted}) == 7
    assert rl.screening and rl.reward_model.fitted == len(rl.log) == 10  # refitted on the round's later answers


class ScriptedLLM:
    """Says "fetal anatomy study" only when the prompt ends on the checklist-rewrite instruction; reports every
    answer as cached, as a cache another run filled would."""

    def chat(self, messages, **sampling):
        wanted = messages[-1]["content"].rstrip().endswith("At most 5 bullets.")
        return Answer("- fetal anatomy study" if wanted else "Rest and eat well.", cached=True)


def test_prompts_on_one_point_are_judged_against_each_other(points):
    profile, pts = points
    policy = PromptPolicy(8)
    initial_bias(policy, INITIAL, strength=0.0)
    rl = LocalRL(policy, ScriptedLLM(), ConceptMatcher(profile), pts,
                 RLConfig(episodes_per_round=6, prompts_per_point=2, use_reward_model=False), seed=3)
    episodes = rl.run_episodes()
    pairs = {}
    for e in episodes:
        pairs.setdefault(e.patient_id, []).append(e)
    assert len(pairs) == 6 and all(len(p) == 2 for p in pairs.values())
    for a, b in pairs.values():
        assert (a.baseline, b.baseline) == (b.reward, a.reward)  # her own other prompt is the baseline
    # Equal rewards on her point teach nothing: her gradient is zero, whatever the value head says.
    same = [replace(e, reward=0.3, baseline=0.3) for e in next(iter(pairs.values()))]
    assert float(rl.patient_gradients(same)[0].abs().max()) == 0.0
    # Calls are the distinct requests of this run, though the LLM answered every one "from the cache".
    context = {p.example.patient_id: p.context for p in pts}
    asked = {json.dumps(render(context[e.patient_id], e.params).messages) for e in episodes}
    assert rl.llm_calls == len(asked) > 0


def test_exploration_temperature_flattens_the_draws_not_the_choice(points):
    _, pts = points
    torch.manual_seed(0)
    policy = PromptPolicy(8)
    initial_bias(policy, INITIAL)
    state = pts[0].state
    share = {}
    for t in (1.0, 3.0):
        draws = policy.sample(state, torch.Generator().manual_seed(0), n=400, temperature=t)
        share[t] = np.mean([d.placement == INITIAL.placement for d in draws])
    assert share[3.0] < share[1.0] - 0.15
    assert policy.best(state) == INITIAL
    x = torch.as_tensor(state.vector()).unsqueeze(0)
    every = torch.arange(3).unsqueeze(1)  # the three placements, other factors at option 0
    actions = torch.zeros(3, len(FACTOR_NAMES), dtype=torch.long)
    actions[:, FACTOR_NAMES.index("placement")] = every[:, 0]
    dist = policy.distribution(x, temperature=3.0)["placement"]
    assert torch.allclose(dist.probs.sum(), torch.tensor(1.0))
    assert policy.log_prob(x.repeat(3, 1), actions, 3.0).shape == (3,)


def test_phase_c_refuses_a_reward_model_for_released_updates(tmp_path):
    from pmlm.client.phase_c import SitePhaseC
    from pmlm.common.phase_c import PhaseCConfig

    with pytest.raises(ValueError, match="depend on the others"):
        SitePhaseC("s", tmp_path, [], "obgyn", PhaseCConfig(use_reward_model=True), "run")


def test_the_released_sums_signal_is_estimated_from_public_figures_alone():
    """server/phase_c.signal_to_noise: a sum of pure noise reads ratio ~1 and SNR ~0; a known signal under the
    same noise is recovered within a few percent; the noise of several sites adds in variance."""
    from pmlm.server.phase_c import signal_to_noise

    rng = np.random.default_rng(7)
    dim, stds = 4000, [0.5, 0.5, 0.5, 0.5]  # four sites' public standard deviations: the sum's sd is 1.0
    noise = rng.normal(0.0, 1.0, dim)
    pure = signal_to_noise(noise, stds)
    assert pure["noise_norm"] == pytest.approx(np.sqrt(dim)) and pure["dim"] == dim
    assert pure["ratio"] == pytest.approx(1.0, abs=0.05) and pure["snr"] < 0.2
    signal = rng.normal(0.0, 1.0, dim)
    signal *= 2.0 * np.sqrt(dim) / np.linalg.norm(signal)  # |signal| = 2 x the noise's expected norm
    mixed = signal_to_noise(signal + noise, stds)
    assert mixed["snr"] == pytest.approx(2.0, rel=0.05)
    assert signal_to_noise(signal + noise, [1.0] * 4)["snr"] < mixed["snr"] / 2  # twice the sd, four sites


def test_a_noisy_step_from_few_episodes_keeps_the_initial_prompt():
    """Three sites' noise over 18 episodes: the full step is mostly noise and flips the initial prompt's
    choices; the noise-limited step keeps them, and a step from many episodes is not limited at all."""
    from pmlm.common.phase_c import PhaseCConfig
    from pmlm.server.phase_c import noise_limited_lr

    c = PhaseCConfig()
    stds = [2.0, 2.0, 2.0]  # each site's noise multiplier x clip, as its metrics report it
    assert noise_limited_lr(c.lr, 240.0, stds, c.max_step_noise) == c.lr  # bench/rl.py's default run
    small = noise_limited_lr(c.lr, 18.0, stds, c.max_step_noise)
    assert small == pytest.approx(c.max_step_noise * 18 / np.sqrt(12.0)) and small < c.lr
    assert noise_limited_lr(c.lr, 18.0, [], c.max_step_noise) == c.lr  # no noise reported: nothing to limit
    rng = np.random.default_rng(0)
    states = [PolicyState((e / np.linalg.norm(e)).astype(np.float32), top1_prob=0.5, history_length=20)
              for e in rng.standard_normal((10, 64))]
    kept = {}
    for lr in (c.lr, small):
        same = 0
        for draw in range(20):
            torch.manual_seed(draw)
            policy = PromptPolicy(64)
            initial_bias(policy, INITIAL)
            noise = rng.normal(0.0, np.sqrt(12.0), n_parameters(policy))  # the noisy sum of a round with no signal
            apply_update(policy, noise, lr=lr, scale=18.0)
            same += sum(getattr(policy.best(s), f) == getattr(INITIAL, f) for s in states for f in FACTOR_NAMES)
        kept[lr] = same / (20 * len(states) * len(FACTOR_NAMES))  # share of the prompt's choices left as they were
    assert kept[c.lr] < 0.6 and kept[small] > 0.95, kept


def test_a_head_bias_update_sends_zeros_elsewhere_and_noise_alone_flips_no_choice(points, tmp_path):
    """Phase C's released update covers the heads' biases only: every other coordinate is an exact zero (no
    noise, nothing of hers), and a round of pure noise at the capped step leaves every state's choices as
    they were, where noise on every weight changed a few percent of them (the test above)."""
    from pmlm.client.phase_c import rl_config
    from pmlm.common.phase_c import PhaseCConfig
    from pmlm.server.phase_c import noise_limited_lr

    profile, pts = points
    c = PhaseCConfig()
    assert rl_config(c).trains == "head-biases"
    policy = PromptPolicy(8)
    mask = trained_mask(policy, "head-biases")
    assert 0 < mask.sum() < 100 and mask.sum() == sum(h.bias.numel() for h in policy.heads.values())
    rl = LocalRL(policy, ListingLLM(), ConceptMatcher(profile), pts, replace(rl_config(c), clip=0.5))
    ledger = SiteLedger(tmp_path / "s", "s", BudgetConfig(10.0, 1e-5, {"phase_c": 1.0}))
    episodes = rl.run_episodes(12)
    exact = rl.clipped_sum(episodes)
    assert np.all(exact[~mask] == 0) and np.any(exact[mask] != 0)
    vector, _ = rl.noisy_update(episodes, ledger, GaussianRelease(1.0, 0.5), rng=np.random.default_rng(0), round=0,
                                run_id="r")
    assert np.all(vector[~mask] == 0)
    assert 0.3 < np.std(vector[mask] - exact[mask]) < 0.7  # N(0, 0.5^2) on the biases

    rng = np.random.default_rng(1)
    states = [PolicyState((e / np.linalg.norm(e)).astype(np.float32), top1_prob=0.5, history_length=20)
              for e in rng.standard_normal((10, 64))]
    stds = [2.0, 2.0, 2.0]
    lr = noise_limited_lr(c.lr, 18.0, stds, c.max_step_noise)
    for draw in range(20):
        torch.manual_seed(draw)
        policy = PromptPolicy(64)
        initial_bias(policy, INITIAL)
        mask = trained_mask(policy, "head-biases")
        apply_update(policy, rng.normal(0.0, np.sqrt(12.0), mask.size) * mask, lr=lr, scale=18.0)
        assert all(policy.best(s) == INITIAL for s in states)
    with pytest.raises(ValueError, match="trains must be one of"):
        trained_mask(policy, "trunk")
    with pytest.raises(ValueError, match="phase-c-trains must be one of"):
        PhaseCConfig(trains="trunk")
