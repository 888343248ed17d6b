"""Phase C mechanics with a scripted stand-in LLM: learning moves the policy; only clipped, noised sums leave."""

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pmlm.client.examples import Example
from pmlm.client.reward import ConceptMatcher
from pmlm.client.rl import LocalRL, Point, RLConfig, apply_update, n_parameters
from pmlm.common.policy import PolicyState, PromptPolicy, initial_bias
from pmlm.common.privacy import BudgetConfig, BudgetExhausted, SiteLedger
from pmlm.common.profiles import load_profile
from pmlm.common.prompt import INITIAL, PatientContext


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
        system = messages[0]["content"]
        if "one bullet per expected care event" not in system:
            return Answer("Rest and eat well.")
        items = re.findall(r"^- (.+)$", system, flags=re.M)
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
    vector, entry = rl.noisy_update(episodes, ledger, noise_multiplier=1.0, rng=rng, round=0, run_id="r")
    assert vector.shape == (n_parameters(policy),)  # one vector for the whole site, nothing per patient
    noise = vector - exact
    assert 0.3 < np.std(noise) < 0.7  # N(0, (1.0 * 0.5)^2) per coordinate
    assert entry["mechanism"]["l2_sensitivity"] == 0.5 and entry["mechanism"]["noise_multiplier"] == 1.0
    # A release the budget cannot afford draws no noise and sends nothing.
    tight = SiteLedger(tmp_path / "t", "t", BudgetConfig(0.1, 1e-5, {"phase_c": 1.0}))
    state = rng.bit_generator.state
    with pytest.raises(BudgetExhausted):
        rl.noisy_update(episodes, tight, noise_multiplier=0.3, rng=rng, round=0, run_id="r")
    assert rng.bit_generator.state == state


def test_reward_model_screens_candidates(points):
    profile, pts = points
    policy = PromptPolicy(8)
    initial_bias(policy, INITIAL, strength=0.0)
    llm = ListingLLM()
    rl = LocalRL(policy, llm, ConceptMatcher(profile), pts,
                 RLConfig(episodes_per_round=12, warmup_episodes=36, candidates=8, explore=0.0), seed=1)
    for _ in range(3):
        rl.run_episodes()
    assert rl.reward_model.fitted >= 36
    screened = rl.run_episodes()
    # After warm-up the model prefers the listing format, so screened episodes score higher than random ones.
    assert np.mean([e.reward for e in screened]) > np.mean([e.reward for e in rl.log[:36]])
