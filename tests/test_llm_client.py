"""LLMClient against a fake OpenAI-compatible server on 127.0.0.1: answers, cache, retries, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_llm import FakeOpenAIServer, Reply, chat_body, serving

from pmlm.cli import main
from pmlm.client.llm import (
    LLMBusy,
    LLMClient,
    LLMConfig,
    LLMConfigError,
    LLMError,
    LLMResponseError,
    LLMUnavailable,
)
from pmlm.client.llm.cache import CACHE_FILENAME
from pmlm.client.llm.local_server import free_loopback_port


@pytest.fixture
def fake():
    with serving(FakeOpenAIServer()) as server:
        yield server


@pytest.fixture
def dead_url():
    return f"http://127.0.0.1:{free_loopback_port()}/v1"  # nothing listens there


def make_client(base_url, sleeps=None, **settings):
    settings.setdefault("model", "fake-model")
    config = LLMConfig(base_url=base_url, **settings)
    return LLMClient(config, sleep=(sleeps.append if sleeps is not None else lambda s: None))


# -- configuration -----------------------------------------------------------------------------------

def test_config_layers_defaults_toml_env_and_overrides(tmp_path):
    toml = tmp_path / "site.toml"
    toml.write_text('[llm]\nbase_url = "https://10.0.0.5:8000/v1/"\nmodel = "from-toml"\nmax_tokens = 64\n'
                    'timeout_s = 5\ncache_dir = "llm-cache"\n[llm.extra_body]\nrepetition_penalty = 1.1\n')
    config = LLMConfig.load(toml, environ={"PMLM_LLM_MODEL": "from-env"}, max_tokens=None, temperature=0.3)
    assert config.base_url == "https://10.0.0.5:8000/v1"  # trailing slash dropped
    assert config.model == "from-env"  # environment over file
    assert (config.max_tokens, config.timeout_s, config.temperature) == (64, 5.0, 0.3)
    assert config.extra_body == {"repetition_penalty": 1.1}
    assert config.cache_dir == tmp_path / "llm-cache"  # relative to the config file, not the working directory
    assert LLMConfig.load(environ={}).is_embedded  # nothing configured: the embedded server


def test_config_rejects_unknown_and_malformed_settings(tmp_path):
    with pytest.raises(LLMConfigError, match="unknown LLM setting.*temprature"):
        LLMConfig.from_dict({"temprature": 0})
    with pytest.raises(LLMConfigError, match="max_tokens"):
        LLMConfig.from_dict({"max_tokens": "lots"})
    with pytest.raises(LLMConfigError, match="no such config file"):
        LLMConfig.load(tmp_path / "missing.toml", environ={})
    with pytest.raises(LLMConfigError, match="no model named"):
        LLMClient(LLMConfig(base_url="http://127.0.0.1:1/v1"))


def test_plain_http_is_refused_off_loopback(tmp_path):
    for remote in ("http://10.0.0.5:8000/v1", "http://llm.example.org/v1", "HTTP://[2001:db8::1]:8000/v1",
                   "http://127.0.0.1.evil.example/v1"):
        with pytest.raises(LLMConfigError, match="plain http to a host that is not loopback.*https"):
            LLMConfig(base_url=remote, model="m")
    toml = tmp_path / "site.toml"
    toml.write_text('[llm]\nbase_url = "http://10.0.0.5:8000/v1"\n')
    with pytest.raises(LLMConfigError, match="not loopback"):
        LLMConfig.load(toml, environ={})
    with pytest.raises(LLMConfigError, match="not loopback"):
        LLMConfig.load(environ={"PMLM_LLM_BASE_URL": "http://llm.example.org/v1"})
    with pytest.raises(LLMConfigError, match="http\\(s\\) URL"):
        LLMConfig(base_url="ftp://llm.example.org/v1")
    # the embedded server and other on-machine servers stay on plain http; remote ones use https
    for allowed in ("http://127.0.0.1:8080/v1", "http://localhost:11434/v1", "http://[::1]:8000/v1",
                    "http://127.0.0.2:9000/v1", "https://llm.example.org/v1", "https://10.0.0.5:8000/v1"):
        assert LLMConfig(base_url=allowed, model="m").base_url == allowed


def test_api_key_resolution_order():
    config = LLMConfig(base_url="https://x/v1", model="m")
    assert config.resolve_api_key({"OPENAI_API_KEY": "o"}) == "o"
    assert config.resolve_api_key({"OPENAI_API_KEY": "o", "PMLM_LLM_API_KEY": "p"}) == "p"
    named = LLMConfig(base_url="https://x/v1", model="m", api_key_env="SITE_KEY")
    assert named.resolve_api_key({"SITE_KEY": "s", "PMLM_LLM_API_KEY": "p"}) == "s"
    with pytest.raises(LLMConfigError, match="SITE_KEY is not set"):
        named.resolve_api_key({})
    assert config.resolve_api_key({}) == "no-key"  # self-hosted servers need none; the client needs a string
    assert "secret" not in repr(LLMConfig(api_key="secret"))


# -- answers and counters --------------------------------------------------------------------------------

def test_chat_returns_text_and_tokens_and_sends_sampling(fake):
    with make_client(fake.base_url, max_tokens=32, extra_body={"repeat_penalty": 1.15}) as client:
        answer = client.chat([{"role": "user", "content": "Hi"}], top_k=20)
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens, answer.cached) == ("Hello there.", 7, 3, False)
    assert answer.model == "fake-model" and answer.finish_reason == "stop"
    sent = fake.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["json"]["model"] == "fake-model" and sent["json"]["temperature"] == 0.0
    assert sent["json"]["max_tokens"] == 32
    assert sent["json"]["repeat_penalty"] == 1.15 and sent["json"]["top_k"] == 20  # server extensions in the body
    usage = client.usage
    assert (usage.calls, usage.cache_hits, usage.prompt_tokens, usage.completion_tokens) == (1, 0, 7, 3)


def test_cache_hit_makes_no_call_and_survives_a_new_client(fake, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with make_client(fake.base_url, cache_dir=tmp_path) as client:
        first = client.chat(messages)
        second = client.chat(messages)
        assert len(fake.requests) == 1
        assert (first.cached, second.cached, second.text) == (False, True, first.text)
        assert (client.usage.calls, client.usage.cache_hits, client.usage.completion_tokens) == (1, 1, 3)
        client.chat(messages, max_tokens=5)  # other sampling parameters: another key
        assert len(fake.requests) == 2
    with make_client(fake.base_url, cache_dir=tmp_path) as again:
        assert again.chat(messages).cached
        assert again.usage.calls == 0
    with make_client(fake.base_url, cache_dir=tmp_path, model="other-model") as other:
        assert not other.chat(messages).cached  # the model is part of the key
    assert oct((tmp_path / CACHE_FILENAME).stat().st_mode & 0o777) == "0o600"


def test_cache_scope_keys_answers_by_endpoint_name_not_url(fake, dead_url, tmp_path):
    """The embedded server gets a new port per start; with a cache scope its answers stay reusable."""
    with make_client(fake.base_url, cache_dir=tmp_path, cache_scope="embedded:model.gguf") as client:
        first = client.chat("Hi")
    with make_client(dead_url, cache_dir=tmp_path, cache_scope="embedded:model.gguf") as moved:
        again = moved.chat("Hi")  # nothing listens at dead_url: only the cache can answer
    assert again.cached and again.text == first.text and len(fake.requests) == 1
    with make_client(dead_url, cache_dir=tmp_path, max_retries=0) as unscoped:
        with pytest.raises(LLMUnavailable):
            unscoped.chat("Hi")  # without a scope the URL is part of the key


def test_random_samples_are_not_cached_unless_seeded(fake, tmp_path):
    with make_client(fake.base_url, cache_dir=tmp_path, temperature=0.7) as client:
        client.chat("Hi")
        client.chat("Hi")
        assert len(fake.requests) == 2
        client.chat("Hi", seed=1)
        assert client.chat("Hi", seed=1).cached
        assert client.chat("Hi", use_cache=False, temperature=0).cached is False
    assert len(fake.requests) == 4



def test_a_damaged_entry_is_a_miss_and_the_fresh_answer_replaces_it(fake, tmp_path, caplog):
    import sqlite3

    with make_client(fake.base_url, cache_dir=tmp_path) as client:
        client.chat("Hi")
    with sqlite3.connect(tmp_path / CACHE_FILENAME) as db:
        db.execute("UPDATE responses SET value = '{\"text\": 3'")  # torn JSON
    with make_client(fake.base_url, cache_dir=tmp_path) as client:
        again = client.chat("Hi")
        assert not again.cached and len(fake.requests) == 2 and client._cache.damaged == 1
        assert client.chat("Hi").cached  # the fresh answer was kept
    assert "damaged" in caplog.text
    with sqlite3.connect(tmp_path / CACHE_FILENAME) as db:
        db.execute("""UPDATE responses SET value = '{"text": ["not", "text"], "prompt_tokens": 1}'""")
    with make_client(fake.base_url, cache_dir=tmp_path) as client:
        assert not client.chat("Hi").cached  # well-formed JSON, wrong fields: a miss too
    assert len(fake.requests) == 3


def test_an_unreadable_cache_file_is_set_aside_and_caching_carries_on(fake, tmp_path, caplog):
    (tmp_path / CACHE_FILENAME).write_bytes(b"this is not an SQLite database" * 100)
    with make_client(fake.base_url, cache_dir=tmp_path) as client:
        assert client.chat("Hi").text == "Hello there."  # no error: a miss
        assert client.chat("Hi").cached  # a fresh database took the answer
    assert len(fake.requests) == 1 and "unreadable" in caplog.text
    assert len(list(tmp_path.glob(f"{CACHE_FILENAME}.corrupt-*"))) == 1


def test_the_cache_keeps_at_most_max_entries(tmp_path):
    from pmlm.client.llm.cache import ResponseCache

    cache = ResponseCache(tmp_path, max_entries=100)
    for i in range(600):
        cache.put(f"k{i}", {"text": str(i), "prompt_tokens": 1, "completion_tokens": 1, "model": "m"})
    assert 100 <= len(cache) < 100 + 256  # pruned at every 256th put, oldest first
    assert cache.get("k599")["text"] == "599" and cache.get("k0") is None


def test_a_site_llm_caches_in_its_site_directory(fake, tmp_path):
    from pmlm.client.llm import site_llm_config
    from pmlm.common.site_layout import LLM_CACHE_DIR

    site = tmp_path / "site"
    config = site_llm_config(site, {"base_url": fake.base_url, "model": "fake-model"})
    assert config.cache_dir == site / LLM_CACHE_DIR
    with LLMClient(config) as client:
        client.chat("Hi")
        assert client.chat("Hi").cached and len(fake.requests) == 1
        assert not client.chat("Hi there").cached and len(fake.requests) == 2  # another prompt: a miss
    assert (site / LLM_CACHE_DIR / CACHE_FILENAME).is_file()
    assert site_llm_config(site, {"cache_dir": "elsewhere"}).cache_dir == site / "elsewhere"
    assert site_llm_config(site, {"cache_dir": ""}).cache_dir is None  # switched off


def test_the_embedded_model_is_named_by_its_file_digest(tmp_path):
    """Two model files of the same name are two models to the cache."""
    from pmlm.client.llm.local_server import EmbeddedLLMServer

    scopes = []
    for content in (b"weights one", b"weights two"):
        folder = tmp_path / content.decode().replace(" ", "_")
        folder.mkdir()
        (folder / "model.gguf").write_bytes(content)
        server = EmbeddedLLMServer(folder / "model.gguf")
        server.port = 1  # config() only reads it
        scopes.append(server.config().cache_scope)
    assert scopes[0] != scopes[1] and all("model.gguf:sha256=" in s for s in scopes)


# -- retries and errors --------------------------------------------------------------------------------

def test_retries_with_exponential_backoff_then_succeeds(fake):
    fake.script = [Reply(503, {"error": "loading"}), Reply(502, "bad gateway", content_type="text/plain"), Reply()]
    sleeps: list[float] = []
    client = make_client(fake.base_url, sleeps, max_retries=3, backoff_s=0.5)
    assert client.chat("Hi").text == "Hello there."
    assert len(fake.requests) == 3
    assert len(sleeps) == 2 and 0.375 <= sleeps[0] <= 0.625 and 0.75 <= sleeps[1] <= 1.25  # 0.5, 1.0 ± 25%
    assert (client.usage.calls, client.usage.retries, client.usage.failures) == (3, 2, 0)


def test_always_500_gives_a_clear_error_after_max_retries(fake, tmp_path):
    fake.default = Reply(500, {"error": {"message": "model crashed"}})
    sleeps: list[float] = []
    client = make_client(fake.base_url, sleeps, max_retries=2, cache_dir=tmp_path / "cache")
    with pytest.raises(LLMUnavailable) as caught:
        client.chat("Hi")
    message = str(caught.value)
    assert fake.base_url in message and "fake-model" in message
    assert "HTTP 500" in message and "model crashed" in message and "after 3 attempts" in message
    assert len(fake.requests) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0]
    assert client.usage.failures == 1
    assert not (tmp_path / "cache").exists()


def test_backoff_is_capped_and_honours_retry_after(fake):
    fake.script = [Reply(429, {"error": "slow down"}, headers={"retry-after": "3"})]
    sleeps: list[float] = []
    client = make_client(fake.base_url, sleeps, max_retries=1, backoff_max_s=8)
    client.chat("Hi")
    assert sleeps == [3.0]
    assert client.backoff_delay(10) <= 8 * 1.25
    assert client.backoff_delay(0, retry_after_s=600) == 8  # a server cannot park us for ten minutes


def test_client_errors_are_not_retried(fake):
    fake.default = Reply(404, {"error": {"message": "model 'nope' not found"}})
    client = make_client(fake.base_url, max_retries=3)
    with pytest.raises(LLMError, match=r"HTTP 404.*not found.*base URL ends in /v1") as caught:
        client.chat("Hi")
    assert not isinstance(caught.value, LLMUnavailable)
    assert len(fake.requests) == 1


def test_connection_refused_is_clear_and_writes_nothing(dead_url, tmp_path):
    sleeps: list[float] = []
    client = make_client(dead_url, sleeps, max_retries=1, cache_dir=tmp_path / "cache")
    with pytest.raises(LLMUnavailable, match=rf"{dead_url}.*connection refused.*after 2 attempts"):
        client.chat("Hi")
    assert len(sleeps) == 1 and client.usage.calls == 0
    assert not (tmp_path / "cache").exists()


def test_timeout_is_clear(fake):
    fake.default = Reply(delay_s=1.0)
    client = make_client(fake.base_url, timeout_s=0.2, max_retries=0)
    started = time.monotonic()
    with pytest.raises(LLMUnavailable, match=r"no answer within 0.2 s \(timeout\)"):
        client.chat("Hi")
    assert time.monotonic() - started < 0.9


@pytest.mark.parametrize("reply, expected", [
    (Reply(200, "<html>proxy login</html>", content_type="text/html"), "not JSON: '<html>proxy login"),
    (Reply(200, "{not json", content_type="application/json"), "not valid JSON"),
    (Reply(200, {"object": "chat.completion", "choices": []}), "no choices"),
    (Reply(200, {"id": "x"}), "no choices"),
    (Reply(200, chat_body(text="")), "empty"),
    (Reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}), "empty"),
])
def test_malformed_answers_give_a_clear_error_and_are_not_cached(fake, tmp_path, reply, expected):
    fake.default = reply
    client = make_client(fake.base_url, cache_dir=tmp_path)
    with pytest.raises(LLMResponseError, match="fake-model") as caught:
        client.chat("Hi")
    assert expected in str(caught.value)
    assert len(fake.requests) == 1  # a malformed answer is not retried
    assert not (tmp_path / CACHE_FILENAME).exists()


def test_concurrent_chats_share_the_cache_and_counters(fake, tmp_path):
    client = make_client(fake.base_url, cache_dir=tmp_path)
    errors = []

    def worker(i):
        try:
            client.chat(f"question {i % 4}")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert client.usage.calls + client.usage.cache_hits == 16
    assert client.usage.completion_tokens == 3 * client.usage.calls



def test_max_concurrent_makes_calls_wait_their_turn_before_the_timeout_starts(fake):
    """llama.cpp's server answers one request at a time: calls sent together used to time out inside it."""
    fake.default = Reply(delay_s=0.3)
    client = make_client(fake.base_url, timeout_s=0.5, max_retries=0, max_concurrent=1)
    errors, ends = [], []

    def ask(i):
        try:
            client.chat(f"question {i}")
            ends.append(time.monotonic())
        except Exception as exc:  # surfaced below
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One at a time (the fake itself would answer all four at once), each within its own 0.5 s timeout.
    assert not errors and max(ends) - started >= 4 * 0.3
    waiting = threading.Thread(target=ask, args=(9,))
    waiting.start()
    time.sleep(0.05)
    with pytest.raises(LLMBusy, match="no turn within 0.1 s"):
        client.chat("impatient", wait_s=0.1)
    waiting.join()
    with pytest.raises(LLMConfigError, match="max_concurrent"):
        LLMConfig(max_concurrent=-1)

# -- the CLI ------------------------------------------------------------------------------------------------

def test_cli_ask_unreachable_exits_nonzero_and_writes_nothing(dead_url, tmp_path, capsys):
    site = tmp_path / "site.toml"
    site.write_text("[llm]\nmax_retries = 1\nbackoff_s = 0.01\n")
    out, cache = tmp_path / "answer.txt", tmp_path / "cache"
    code = main(["llm", "ask", "--config", str(site), "--base-url", dead_url, "--model", "m", "--timeout", "2",
                 "--cache-dir", str(cache), "--out", str(out), "Hi"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pmlm: error: LLM endpoint" in err and "connection refused" in err and "after 2 attempts" in err
    assert "Traceback" not in err
    assert not out.exists() and not cache.exists() and sorted(tmp_path.iterdir()) == [site]


def test_cli_ask_writes_the_answer_and_then_answers_from_cache(fake, tmp_path, capsys):
    out = tmp_path / "answers" / "a.txt"
    argv = ["llm", "ask", "--base-url", fake.base_url, "--model", "fake-model", "--cache-dir", str(tmp_path / "c"),
            "--out", str(out), "--system", "Be brief.", "Hi"]
    assert main(argv) == 0
    assert out.read_text() == "Hello there.\n"
    assert main(argv) == 0
    assert "cache" in capsys.readouterr().err and len(fake.requests) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.txt"]  # no temp file left


def test_cli_check_against_an_endpoint_prints_model_answer_and_speed(fake, capsys):
    assert main(["llm", "check", "--base-url", fake.base_url, "--model", "fake-model"]) == 0
    printed = capsys.readouterr().out
    assert "model: fake-model" in printed and "answer: Hello there." in printed and "tokens/s" in printed


def test_cli_check_unreachable_exits_nonzero_as_a_process(dead_url, tmp_path):
    site = tmp_path / "site.toml"
    site.write_text("[llm]\nmax_retries = 1\nbackoff_s = 0.01\n")
    env = {**os.environ, "PMLM_LLM_API_KEY": "", "OPENAI_API_KEY": ""}
    result = subprocess.run(
        [sys.executable, "-m", "pmlm", "llm", "check", "--config", str(site), "--base-url", dead_url, "--model", "m"],
        capture_output=True, text=True, timeout=60, env=env, cwd=Path(__file__).parent,
    )
    assert result.returncode == 2
    assert "connection refused" in result.stderr and dead_url in result.stderr
    assert "Traceback" not in result.stderr
