"""The reward models of on-site refinement: what each can and cannot learn from a few logged answers."""

from dataclasses import replace

import numpy as np
import pytest

from pmlm.client.examples import Example
from pmlm.client.reward import ConceptMatcher, score_answer
from pmlm.client.reward_model import Answered, AnswersModel, OptionsModel, reward_model
from pmlm.client.rl import Point
from pmlm.common.assemble.policy import PolicyState
from pmlm.common.assemble.render import INITIAL, PatientContext, render
from pmlm.common.profiles import load_profile
from tests.test_rl import ListingLLM


@pytest.fixture(scope="module")
def eight_events():
    """Eight profile concepts whose names name only themselves, in the order her predictions list them."""
    profile = load_profile()
    matcher = ConceptMatcher(profile)
    chosen = [c for c in profile.concepts if matcher.mentioned(c.name) == {c.id}][:8]
    assert len(chosen) == 8
    return matcher, [c.name for c in chosen], [c.id for c in chosen]


def point(pid: str, names: list[str], targets: list[str], seed: int) -> Point:
    ctx = PatientContext(predictions=[(n, 0.5) for n in names])
    ex = Example(pid, None, targets[0], [], sorted(targets), [], "train")
    state = PolicyState(np.random.default_rng(seed).standard_normal(8).astype(np.float32), top1_prob=0.5)
    return Point(ex, ctx, state)


def logged(points: list[Point], matcher: ConceptMatcher) -> list[Answered]:
    """Every point tried with 3, 5 and 8 of her predicted events listed, and once in a form the LLM ignores."""
    llm, out = ListingLLM(), []
    for p in points:
        for params in [replace(INITIAL, format=0, self_items=k) for k in (3, 5, 8)] + [INITIAL]:
            answer = llm.chat(render(p.context, params).messages)
            s = score_answer(answer.text, p.example, matcher)
            out.append(Answered(p, params, s.reward, s.mentioned, s.words))
    return out


def test_the_answers_model_tells_which_list_length_pays_for_her_and_the_options_model_cannot(eight_events):
    matcher, names, ids = eight_events
    # Half the women need her first three predicted events, the other half the last five.
    train = [point(f"p{i}", names, ids[:3] if i % 2 else ids[3:], i) for i in range(10)]
    early, late = point("early", names, ids[:3], 100), point("late", names, ids[3:], 101)
    answers, options = AnswersModel(matcher), OptionsModel()
    log = logged(train, matcher)
    answers.fit(log)
    options.fit(log)
    lengths = [replace(INITIAL, format=0, self_items=k) for k in (3, 5, 8)]

    def best(model, p):
        return lengths[int(np.argmax(model.predict(p, lengths)))].self_items

    # Her list's first three are her needs: list three. Her needs are the last five: list all eight.
    assert (best(answers, early), best(answers, late)) == (3, 8)
    # The options model sees one average over both kinds of women, so it picks one length for both.
    assert best(options, early) == best(options, late)
    # And both learn that the form the LLM ignores names nothing: it ranks below listing her events.
    for model in (answers, options):
        scores = model.predict(early, [INITIAL, lengths[0]])
        assert scores[0] < scores[1]


def test_the_answers_model_predicts_the_reward_it_will_be_scored_with(eight_events):
    matcher, names, ids = eight_events
    train = [point(f"p{i}", names, ids[:3] if i % 2 else ids[3:], i) for i in range(10)]
    model = AnswersModel(matcher)
    model.fit(logged(train, matcher))
    fresh = point("fresh", names, ids[:3], 7)
    for answered in logged([fresh], matcher):  # the LLM here is deterministic: the model should learn it
        assert model.predict(fresh, [answered.params])[0] == pytest.approx(answered.reward, abs=0.15)


def test_an_unknown_reward_model_is_refused_by_name(eight_events):
    matcher, _, _ = eight_events
    with pytest.raises(ValueError, match="options.*answers"):
        reward_model("neural", matcher)
