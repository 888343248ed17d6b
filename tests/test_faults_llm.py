"""The site's LLM endpoint misbehaving: too slow, failing, hanging up, or answering garbage.

Builds on the fake OpenAI-compatible server of test_llm_client (its retry, backoff and malformed-JSON
tests are not repeated here). Every fault must end in a bounded number of attempts with an LLMError
that names the endpoint and the cause, leave nothing in the response cache, and make `pmlm advise`
exit 2 with one clear line. An empty answer is the one kind of garbage a scorer may take as an answer:
it names nothing, so the RL refiner and the evaluation score it 0, and it is counted.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from fake_llm import FakeOpenAIServer, Reply, chat_body, serving
from test_llm_client import make_client

from pmlm.cli import main
from pmlm.client.examples import Example
from pmlm.client.llm import LLMEmptyAnswer, LLMResponseError, LLMUnavailable
from pmlm.client.llm.cache import ResponseCache
from pmlm.client.reward import ConceptMatcher
from pmlm.client.rl import LocalRL, Point, RLConfig
from pmlm.client.site_config import SiteConfig
from pmlm.common.assemble.policy import PolicyState, PromptPolicy
from pmlm.common.profiles import load_profile
from pmlm.common.assemble.render import PatientContext

FAULTS = {  # name -> (what the endpoint does, error class, words the message must hold)
    "timeout": (Reply(delay_s=1.5), LLMUnavailable, "no answer within 0.3 s (timeout)"),
    "500 forever": (Reply(500, {"error": {"message": "CUDA out of memory"}}), LLMUnavailable, "HTTP 500"),
    "503 forever": (Reply(503, "overloaded", content_type="text/plain"), LLMUnavailable, "HTTP 503: overloaded"),
    "hang-up": (Reply(hang_up="before_response"), LLMUnavailable, "closed the connection"),
    "hang-up mid-body": (Reply(hang_up="mid_body"), LLMUnavailable, "closed the connection"),
    "not JSON": (Reply(200, "<html>gateway</html>", content_type="text/html"), LLMResponseError, "not JSON"),
    "no choices": (Reply(200, {"object": "chat.completion", "model": "m"}), LLMResponseError, "no choices"),
    "empty": (Reply(200, chat_body(text="  \n ")), LLMEmptyAnswer, "the answer is empty"),
    "absurdly long": (Reply(200, chat_body(text="word " * 400_000)), LLMResponseError, "ignores max_tokens"),
    "content not text": (Reply(200, {"choices": [{"message": {"role": "assistant", "content": [1, 2]}}]}),
                         LLMResponseError, "not text"),
}
RETRIED = {"timeout", "500 forever", "503 forever", "hang-up", "hang-up mid-body"}


@pytest.fixture(scope="module")
def endpoint():  # one server for the module: the advise site's configuration names its URL
    with serving(FakeOpenAIServer()) as server:
        yield server


@pytest.fixture
def fake(endpoint):
    endpoint.script, endpoint.default, endpoint.requests = [], Reply(), []
    return endpoint


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_ends_in_a_clear_bounded_error_and_caches_nothing(fake, tmp_path, fault):
    reply, error, words = FAULTS[fault]
    fake.default = reply
    sleeps: list[float] = []
    client = make_client(fake.base_url, sleeps, timeout_s=0.3, max_retries=2, backoff_s=0.05, max_tokens=200,
                         cache_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(error) as caught:
        client.chat("When is her next scan?")
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert fake.base_url in message and "fake-model" in message and words in message
    attempts = 3 if fault in RETRIED else 1
    assert len(fake.requests) == attempts and len(sleeps) == attempts - 1
    assert sleeps == sorted(sleeps)  # backing off, not hammering
    assert elapsed < attempts * 0.3 + 2.0  # bounded: the timeout applies per attempt
    assert (client.usage.failures, client.usage.retries) == (1, attempts - 1)
    assert len(ResponseCache(tmp_path)) == 0
    # The endpoint recovers: the same client asks again (nothing stale was cached) and caches the answer.
    fake.default = Reply()
    assert client.chat("When is her next scan?").text == "Hello there."
    assert len(fake.requests) == attempts + 1 and len(ResponseCache(tmp_path)) == 1
    client.close()


def test_an_empty_answer_is_returned_as_nothing_when_a_scorer_asks_and_counted(fake, tmp_path):
    fake.default = Reply(200, chat_body(text=""))
    client = make_client(fake.base_url, cache_dir=tmp_path)
    assert client.chat("Hi", allow_empty=True).text == ""
    assert client.chat("Hi", allow_empty=True).cached is False  # never cached: asked again
    with pytest.raises(LLMEmptyAnswer):
        client.chat("Hi")
    assert (client.usage.empty_answers, client.usage.failures, len(fake.requests)) == (3, 1, 3)
    assert len(ResponseCache(tmp_path)) == 0


def test_the_refiner_scores_empty_answers_zero_instead_of_stopping(fake):
    profile = load_profile()
    rng = np.random.default_rng(0)
    points = [Point(Example(f"p{i}", None, "snomed:424619006", [], ["snomed:424619006"], [], "train"),
                    PatientContext(predictions=[("prenatal visit", 0.9)]),
                    PolicyState(rng.standard_normal(8).astype(np.float32), top1_prob=0.9, history_length=10))
              for i in range(4)]
    fake.default = Reply(200, chat_body(text=""))
    client = make_client(fake.base_url)
    rl = LocalRL(PromptPolicy(8), client, ConceptMatcher(profile), points, RLConfig(use_reward_model=False), seed=1)
    episodes = rl.run_episodes(4)  # no LLMError escapes
    assert episodes and all(e.reward == 0.0 and e.f1 == 0.0 for e in episodes)
    assert client.usage.empty_answers == len(fake.requests) > 0 and client.usage.failures == 0


# -- pmlm advise against a faulty endpoint ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory, endpoint):
    root = tmp_path_factory.mktemp("advise")
    (root / "data").mkdir()
    rows = ["patient_id,time,kind,system,code,display,value,unit,end,encounter_class",
            "p1,1995-02-03,patient,,female,,,,,",
            "p1,2024-01-02T10:00:00Z,encounter,http://snomed.info/sct,424441002,Prenatal initial visit,,,,AMB",
            "p1,2024-01-02T10:00:00Z,condition,http://snomed.info/sct,72892002,Normal pregnancy,,,,",
            "p1,2024-02-02T10:00:00Z,encounter,http://snomed.info/sct,424619006,Prenatal visit,,,,AMB",
            "p1,2024-02-02T10:00:00Z,observation,http://loinc.org,29463-7,Body Weight,70.5,kg,,"]
    (root / "data" / "events.csv").write_text("\n".join(rows) + "\n")
    llm = {"base_url": endpoint.base_url, "model": "fake-model", "timeout_s": 0.3, "max_retries": 1,
           "backoff_s": 0.01, "cache_dir": str(root / "site" / "llm_cache")}
    SiteConfig("site-a", str(root / "data"), "obgyn", llm).save(root / "site")
    return root / "site"


@pytest.mark.parametrize("fault", ["timeout", "500 forever", "hang-up", "not JSON", "empty", "absurdly long"])
def test_advise_exits_2_with_one_clear_line(fake, site, capsys, fault):
    reply, _, words = FAULTS[fault]
    fake.default = reply
    code = main(["advise", "--site", str(site), "--patient", "p1"])
    out, err = capsys.readouterr()
    assert code == 2
    assert f"pmlm: error: the LLM could not answer: LLM endpoint {fake.base_url}" in err and words in err
    assert "Traceback" not in err and "Guidance:" not in out
    assert len(fake.requests) == (2 if fault in RETRIED else 1)
    assert not (site / "llm_cache").exists() or len(ResponseCache(site / "llm_cache")) == 0


def test_advise_answers_once_the_endpoint_recovers(fake, site, capsys):
    fake.script = [Reply(503, "warming up", content_type="text/plain")]
    assert main(["advise", "--site", str(site), "--patient", "p1"]) == 0
    assert "Guidance:\nHello there." in capsys.readouterr().out
    assert len(fake.requests) == 2  # one retry after the 503
