"""One fake OpenAI-compatible LLM endpoint on 127.0.0.1 for every test that needs one.

POST /v1/chat/completions answers with the next scripted Reply, then with ``default`` (a fixed answer text), and
records each request's path and JSON body. With ``held=True`` every request waits until ``release`` is set, so a
test can keep the LLM's only turn busy; ``arrived`` is set as soon as a request comes in.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_body(text="Hello there.", prompt_tokens=7, completion_tokens=3, model="fake-model"):
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class Reply:
    """hang_up: "before_response" closes the connection without a word, "mid_body" after half the body."""

    def __init__(self, status=200, body=None, headers=None, delay_s=0.0, content_type="application/json",
                 hang_up=None):
        self.status, self.headers, self.delay_s = status, headers or {}, delay_s
        self.content_type, self.hang_up = content_type, hang_up
        self.body = chat_body() if body is None else body


class FakeOpenAIServer(ThreadingHTTPServer):
    """Scripted replies, then ``default``: a 200 whose answer is chat_body(**answer) (text, tokens, model)."""

    daemon_threads = True

    def __init__(self, held: bool = False, **answer):
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.script: list[Reply] = []
        self.default = Reply(body=chat_body(**answer))
        self.requests: list[dict] = []
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.arrived, self.release = threading.Event(), threading.Event()
        if not held:
            self.release.set()


class _FakeHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        server: FakeOpenAIServer = self.server
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        server.requests.append({"path": self.path, "json": json.loads(body)})
        server.arrived.set()
        server.release.wait(60)  # bounded: a test that forgets to release still ends
        reply = server.script.pop(0) if server.script else server.default
        time.sleep(reply.delay_s)
        if reply.hang_up == "before_response":
            return  # HTTP/1.0: the connection closes with nothing sent
        payload = reply.body if isinstance(reply.body, (bytes, str)) else json.dumps(reply.body)
        payload = payload.encode() if isinstance(payload, str) else payload
        try:
            self.send_response(reply.status)
            self.send_header("content-type", reply.content_type)
            self.send_header("content-length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2] if reply.hang_up == "mid_body" else payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def log_message(self, *args):
        pass


@contextmanager
def serving(server: FakeOpenAIServer):
    """Serves on a daemon thread for the block; on the way out lets held requests go, then closes the socket."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
