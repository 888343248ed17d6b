"""Phase C's LLM for scale runs: an OpenAI-compatible endpoint on 127.0.0.1 that replays real answers.

A hundred sites cannot each run the embedded LLM on 2 cores, yet phase C's orchestration and release costs
only show at that scale. So every site's LLM setting points here. The first `pool_size` distinct prompts
are answered by the real embedded LLM (SmolLM2 through llama.cpp, client/llm/local_server.py) and kept in
a pool file, one JSON line per answer. Every later prompt gets one of those real answers, picked by a hash
of the prompt. Then the site's own reward code scores it against its own patient's targets. The rewards
are real scores of real answers, but not of answers to that prompt. A run on the pool measures cost and
orchestration, not guidance quality. The pool file is reused, so a rerun asks the real LLM nothing.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPLAY_MODEL = "replay-of-smollm2"


class ReplayLLM(ThreadingHTTPServer):
    """Serves POST /v1/chat/completions from the pool at `pool_path`, asking the real LLM until it holds
    `pool_size` answers. Counts: `real` (asked the embedded LLM), `exact` (a pooled prompt asked again),
    `replayed` (another prompt's answer); `real_s`: seconds spent waiting on the embedded LLM."""

    daemon_threads = True

    def __init__(self, pool_path: Path, pool_size: int = 40):
        super().__init__(("127.0.0.1", 0), _ReplayHandler)
        self.pool_path, self.pool_size = Path(pool_path), pool_size
        self.answers: dict[str, dict] = {}
        if self.pool_path.exists():
            for line in self.pool_path.read_text().splitlines():
                entry = json.loads(line)
                self.answers[entry["prompt_sha256"]] = entry
        self.order = sorted(self.answers)  # the replay choice depends on the pool's content, not its history
        self.counts = {"real": 0, "exact": 0, "replayed": 0}
        self.real_s = 0.0  # spent waiting on the embedded LLM (a bench leaves it out of phase C's time)
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self._lock = threading.Lock()
        self._real = None
        self._stack = ExitStack()

    def answer(self, request: dict) -> dict:
        key = hashlib.sha256(json.dumps(request["messages"], sort_keys=True).encode()).hexdigest()
        with self._lock:  # one at a time: the embedded LLM answers one request at a time anyway
            if key in self.answers:
                self.counts["exact"] += 1
                return self.answers[key]
            if len(self.answers) < self.pool_size:
                started = time.perf_counter()
                entry = self._ask_real(key, request)
                self.counts["real"] += 1
                self.real_s += time.perf_counter() - started
                return entry
            if not self.order:
                raise RuntimeError(f"the replay pool {self.pool_path} is empty and may not grow (pool_size 0)")
            self.counts["replayed"] += 1
            return self.answers[self.order[int(key, 16) % len(self.order)]]

    def _ask_real(self, key: str, request: dict) -> dict:
        if self._real is None:
            from pmlm.client.llm import LLMConfig, open_llm

            self._real = self._stack.enter_context(open_llm(LLMConfig()))
        sampling = {k: request[k] for k in ("temperature", "max_tokens", "seed", "top_p") if k in request}
        done = self._real.chat(request["messages"], use_cache=False, allow_empty=True, **sampling)
        entry = {"prompt_sha256": key, "text": done.text, "prompt_tokens": done.prompt_tokens,
                 "completion_tokens": done.completion_tokens}
        self.pool_path.parent.mkdir(parents=True, exist_ok=True)
        with self.pool_path.open("a") as out:
            out.write(json.dumps(entry) + "\n")
        self.answers[key] = entry
        self.order = sorted(self.answers)
        return entry

    def __enter__(self) -> "ReplayLLM":
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        self.server_close()
        self._stack.close()  # stops the embedded LLM if it was started


class _ReplayHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        entry = self.server.answer(request)
        body = json.dumps({
            "id": "replay", "object": "chat.completion", "created": 0, "model": REPLAY_MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": entry["text"]},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": entry["prompt_tokens"], "completion_tokens": entry["completion_tokens"],
                      "total_tokens": entry["prompt_tokens"] + entry["completion_tokens"]},
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
