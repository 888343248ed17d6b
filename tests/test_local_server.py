"""The embedded llama.cpp server: answers through `openai`, and never outlives its owner."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import openai
import pytest

from pmlm.cli import main
from pmlm.client.llm import EmbeddedLLMServer, EmbeddedServerError, LLMClient, LLMConfig, open_llm


@pytest.fixture(scope="session")
def embedded():
    with EmbeddedLLMServer() as server:
        yield server


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by whoever adopted it) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_until_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def answers(base_url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{base_url}/models", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def test_real_server_answers_through_the_openai_client(embedded):
    client = openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0, timeout=30)
    response = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name one fruit."}], max_tokens=8, temperature=0,
    )
    assert response.choices[0].message.content.strip()
    assert 0 < response.usage.completion_tokens <= 8


def test_server_waits_with_a_short_spin_and_keeps_no_logits_for_every_position(embedded):
    """The two settings that took the embedded server from 31 to 84 tokens/s (bench/llm.py)."""
    with open(f"/proc/{embedded.pid}/environ", "rb") as fh:
        environ = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    with open(f"/proc/{embedded.pid}/cmdline", "rb") as fh:
        argv = fh.read().split(b"\0")
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        assert b"GOMP_SPINCOUNT" not in environ or environ[b"GOMP_SPINCOUNT"] == os.environ["GOMP_SPINCOUNT"].encode()
    else:
        assert environ.get(b"GOMP_SPINCOUNT") == b"1000" and b"OMP_WAIT_POLICY" not in environ
    assert argv[argv.index(b"--logits_all") + 1] == b"false"


def test_llm_client_on_the_embedded_server_counts_and_caches(embedded, tmp_path):
    config = embedded.config(LLMConfig(cache_dir=tmp_path, max_tokens=8))
    assert config.extra_body == {"repeat_penalty": 1.15} and config.model == "smollm2"
    with LLMClient(config) as client:
        first = client.chat([{"role": "system", "content": "Answer in one word."},
                             {"role": "user", "content": "What colour is the sky?"}])
        again = client.chat([{"role": "system", "content": "Answer in one word."},
                             {"role": "user", "content": "What colour is the sky?"}])
    assert first.text.strip() and not first.cached and 0 < first.completion_tokens <= 8
    assert again.cached and again.text == first.text
    assert (client.usage.calls, client.usage.cache_hits) == (1, 1)


def test_a_greedy_answer_depends_on_its_prompt_not_on_the_request_before(embedded):
    """Without a fresh evaluation of every prompt, llama-cpp-python reused the previous request's KV cache and
    the same prompt asked twice in a row got different answers (8 times in 12 on the demo's prompts)."""
    questions = ["What care does a patient at gestational week {} need over the next 12 weeks? List the visits, "
                 "tests and screenings one per line, most urgent first." .format(w) for w in (10, 20, 30, 36)]
    config = embedded.config(LLMConfig(max_tokens=60))
    with LLMClient(config) as client:
        def ask(q):
            return client.chat([{"role": "system", "content": "You help a clinician plan prenatal care."},
                                {"role": "user", "content": q}], temperature=0.0).text
        twice = [(ask(q), ask(q)) for q in questions]
        after_others = [ask(q) for q in reversed(questions)][::-1]
    assert all(a == b for a, b in twice), twice
    assert after_others == [a for a, _ in twice]


def test_cli_check_against_the_running_server(embedded, capsys):
    assert main(["llm", "check", "--base-url", embedded.base_url, "--model", "smollm2", "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "model: smollm2" in printed and "tokens/s" in printed


def test_cli_check_without_an_endpoint_starts_and_stops_the_embedded_server(monkeypatch, capsys):
    monkeypatch.delenv("PMLM_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("PMLM_LLM_MODEL", raising=False)
    assert main(["llm", "check", "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "embedded llama.cpp server, ready in" in printed and "model: smollm2" in printed
    base_url = printed.split("endpoint: ", 1)[1].split()[0]
    assert not answers(base_url)


def test_open_llm_stops_the_embedded_server_when_the_block_raises():
    with pytest.raises(RuntimeError, match="caller failed"):
        with open_llm(LLMConfig()) as llm:
            base_url = llm.config.base_url
            assert llm.chat("Say hi.", max_tokens=4).text.strip()
            raise RuntimeError("caller failed")
    assert not answers(base_url)


def test_failed_start_shows_the_server_output_and_leaves_no_process(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file" * 64)
    server = EmbeddedLLMServer(bogus)
    with pytest.raises(EmbeddedServerError, match="exited with status") as caught:
        server.start()
    assert "its last output:" in str(caught.value) and str(caught.value).count("\n") >= 2
    assert server.pid is not None and not process_alive(server.pid)


def test_startup_timeout_is_clear_and_stops_the_process():
    server = EmbeddedLLMServer(startup_timeout_s=0.05)
    with pytest.raises(EmbeddedServerError, match=r"not ready within 0.05 s"):
        server.start()
    assert not process_alive(server.pid)


OWNER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pmlm.client.llm import EmbeddedLLMServer
    server = EmbeddedLLMServer().start()
    worker = 0
    if sys.argv[1] == "fork" and (worker := os.fork()) == 0:
        time.sleep(60)  # a forked worker: holds a copy of the server's stdin pipe while it lives
        os._exit(0)
    print(server.pid, server.base_url, worker, flush=True)
    time.sleep(120)
""")


def start_owner(mode: str):
    """A separate PMLM process that starts the embedded server and idles; returns it, the server pid and URL
    and the pid of its forked worker (0 if none)."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, mode], stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([owner.stdout], [], [], 60)
    line = owner.stdout.readline() if ready else ""
    if not line:
        owner.kill()
        owner.wait()
        pytest.fail("the owner process did not start the server")
    pid, base_url, worker = line.split()
    assert process_alive(int(pid)) and answers(base_url)
    return owner, int(pid), base_url, int(worker)


@pytest.mark.parametrize("sig, mode", [(signal.SIGTERM, "plain"), (signal.SIGKILL, "plain"), (signal.SIGKILL, "fork")],
                         ids=["SIGTERM", "SIGKILL", "SIGKILL-with-forked-worker"])
def test_server_does_not_outlive_its_owner(sig, mode):
    # SIGTERM: the owner's handler stops the server, then exits with 143 (atexit and finally blocks still run).
    # SIGKILL: the owner runs no code at all; the kernel closes the owner's end of the server's stdin pipe and
    # the server's watch thread reads EOF. A forked worker keeps a copy of that end open, so there the
    # server notices its changed parent pid instead (within a second). Not covered: a SIGKILL of the whole
    # process tree at once is fine too (the server is in it); a frozen, not dead, owner keeps its server.
    owner, server_pid, base_url, worker = start_owner(mode)
    try:
        os.kill(owner.pid, sig)
        code = owner.wait(timeout=15)
        assert code == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
        assert wait_until_gone(server_pid, timeout_s=10), f"server {server_pid} outlived its owner ({sig.name})"
        assert not answers(base_url)
        if worker:
            assert process_alive(worker)  # the pipe was still held open: the parent-pid check ended the server
    finally:
        if worker:
            os.kill(worker, signal.SIGKILL)
