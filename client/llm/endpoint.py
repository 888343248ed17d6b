"""Access to the site's LLM through any OpenAI-compatible endpoint, via the `openai` client only.

One ``LLMConfig`` says where the LLM is (base URL, model, key) and how to sample; ``LLMClient.chat``
sends one chat request with bounded, jittered retries, answers from the on-disk cache when it may,
and counts calls and tokens. Every failure surfaces as an ``LLMError`` naming the endpoint and the
cause, so the CLI can print one clear line and exit non-zero.

A config without ``base_url`` means "the embedded local server" (see ``local_server.open_llm``):
patient prompts leave the hospital only when a site names an external endpoint explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import random
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import openai

from pmlm.client.llm.cache import ResponseCache, cache_key
from pmlm.common.site_layout import LLM_CACHE_DIR

# Sampling fields the OpenAI chat API names; any other sampling option (repeat_penalty, top_k, min_p)
# is a server extension and travels in the request body as ``extra_body``.
OPENAI_SAMPLING_FIELDS = frozenset(
    {"temperature", "max_tokens", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty"}
)
RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx
# No real token is longer than this many characters: an answer longer than max_tokens times this means the
# endpoint ignored max_tokens (or is not an LLM), and it is refused before it reaches the cache or a scorer.
MAX_CHARS_PER_TOKEN = 64
ENV_BASE_URL = "PMLM_LLM_BASE_URL"
ENV_MODEL = "PMLM_LLM_MODEL"
ENV_API_KEY = "PMLM_LLM_API_KEY"
ENV_OPENAI_API_KEY = "OPENAI_API_KEY"
# The openai client refuses an empty key; self-hosted servers (llama.cpp, vLLM, Ollama) ignore it.
PLACEHOLDER_API_KEY = "no-key"


class LLMError(Exception):
    """The LLM could not give an answer; the message names the endpoint, the model and the cause."""

    def __init__(self, endpoint: str, cause: str, *, model: str | None = None, attempts: int = 1):
        self.endpoint = endpoint
        self.model = model
        self.cause = cause
        self.attempts = attempts
        where = f"LLM endpoint {endpoint}" + (f" (model {model})" if model else "")
        tries = f" [after {attempts} attempts]" if attempts > 1 else ""
        super().__init__(f"{where}: {cause}{tries}")


class LLMUnavailable(LLMError):
    """The endpoint could not serve: connection refused, timeout, 5xx/429 after all retries."""


class LLMBusy(LLMUnavailable):
    """No turn at the endpoint within the caller's wait: ``max_concurrent`` requests were already out."""


class LLMResponseError(LLMError):
    """The endpoint answered, but not with a usable chat completion (not JSON, no choices, empty, overlong)."""


class LLMEmptyAnswer(LLMResponseError):
    """A well-formed completion with no text. Scorers may take it as an answer that names nothing
    (``chat(..., allow_empty=True)``); everyone else gets this error."""


class LLMConfigError(ValueError):
    """The LLM configuration is incomplete or malformed."""


@dataclass(frozen=True)
class LLMConfig:
    """Where the site's LLM is and how to sample from it. ``base_url=None`` = the embedded server."""

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None  # name of the environment variable holding the key
    timeout_s: float = 60.0
    max_retries: int = 2  # retries after the first attempt
    backoff_s: float = 0.5  # first retry waits about this long, then doubling...
    backoff_max_s: float = 8.0  # ...up to this
    temperature: float = 0.0
    max_tokens: int = 200  # SmolLM2 answers in 160-200 tokens; a site with a larger model raises it
    extra_body: Mapping[str, Any] = field(default_factory=dict)  # server-specific sampling, e.g. repeat_penalty
    cache_dir: Path | None = None  # None: no response cache
    # What names the endpoint in cache keys (default: base_url). The embedded server gets a fresh port at every
    # start, so it names its model file (name and SHA-256) instead, and answers stay reusable across runs.
    cache_scope: str | None = None
    # Requests this client has out at once; more wait their turn, and their timeout starts only when sent.
    # 0: no limit. The embedded server sets 1: llama.cpp answers one request at a time, so requests sent
    # together queued inside it and timed out there (bench/serve.py: 8 concurrent Advise calls, 44% failed).
    max_concurrent: int = 0

    def __post_init__(self):
        if self.base_url is not None:
            object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
            check_transport(self.base_url)
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "extra_body", dict(self.extra_body))
        if self.timeout_s <= 0:
            raise LLMConfigError(f"timeout_s must be positive, not {self.timeout_s}")
        if self.max_retries < 0:
            raise LLMConfigError(f"max_retries must be >= 0, not {self.max_retries}")
        if self.max_tokens < 1:
            raise LLMConfigError(f"max_tokens must be >= 1, not {self.max_tokens}")
        if self.max_concurrent < 0:
            raise LLMConfigError(f"max_concurrent must be >= 0 (0: no limit), not {self.max_concurrent}")

    @property
    def is_embedded(self) -> bool:
        return not self.base_url

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LLMConfig":
        return cls().merged(values)

    def merged(self, values: Mapping[str, Any]) -> "LLMConfig":
        """A copy with ``values`` applied; ``None`` values leave a field as it is, unknown keys are an error."""
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise LLMConfigError(f"unknown LLM setting(s): {', '.join(unknown)}; known: {', '.join(known)}")
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if value is None:
                continue
            try:
                changes[name] = _coerce(name, value)
            except (TypeError, ValueError) as exc:
                raise LLMConfigError(f"LLM setting {name}={value!r}: {exc}") from None
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> "LLMConfig":
        """Defaults, then the ``[llm]`` table of the TOML file at ``path``, then the environment, then
        ``overrides`` (``None`` values skipped) — the later wins."""
        config = cls()
        if path is not None:
            values = read_toml_table(Path(path), "llm")
            if values.get("cache_dir") is not None:  # a relative cache_dir lies next to the file that names it
                values["cache_dir"] = Path(path).parent / str(values["cache_dir"])
            config = config.merged(values)
        environ = os.environ if environ is None else environ
        config = config.merged(
            {"base_url": environ.get(ENV_BASE_URL) or None, "model": environ.get(ENV_MODEL) or None}
        )
        return config.merged(overrides)

    def resolve_api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key to send: explicit key, the named variable, PMLM_LLM_API_KEY, OPENAI_API_KEY, or a placeholder."""
        environ = os.environ if environ is None else environ
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            if not environ.get(self.api_key_env):
                raise LLMConfigError(f"the LLM key variable {self.api_key_env} is not set")
            return environ[self.api_key_env]
        return environ.get(ENV_API_KEY) or environ.get(ENV_OPENAI_API_KEY) or PLACEHOLDER_API_KEY


def site_llm_config(site_dir: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> LLMConfig:
    """A site's LLM settings (site.json's ``llm``) with its response cache in the site directory: every LLM
    call the site makes (phase C, refinement, advise, serve) goes through the one cache at SITE_DIR/llm_cache.
    A ``cache_dir`` in the settings moves it (a relative one lies in the site directory); ``""`` switches it off."""
    values = dict(settings or {})
    where = values.pop("cache_dir", None)
    config = LLMConfig.from_dict(values)
    if where == "":
        return config
    where = Path(site_dir) / (LLM_CACHE_DIR if where is None else Path(where))  # an absolute one stays as it is
    return dataclasses.replace(config, cache_dir=where)


def read_toml_table(path: Path, table: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise LLMConfigError(f"no such config file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LLMConfigError(f"{path} is not valid TOML: {exc}") from None
    values = document.get(table, {})
    if not isinstance(values, dict):
        raise LLMConfigError(f"{path}: [{table}] must be a table")
    return values


def _coerce(name: str, value: Any) -> Any:
    if name in ("timeout_s", "backoff_s", "backoff_max_s", "temperature"):
        return float(value)
    if name in ("max_retries", "max_tokens", "max_concurrent"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    if name == "cache_dir":
        return Path(value)
    if name == "extra_body":
        if not isinstance(value, Mapping):
            raise TypeError("must be a table of request-body fields")
        return dict(value)
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url: str) -> None:
    """Refuse a base_url that would carry patient prompts unencrypted off this machine.

    Plain http is allowed only to a loopback host (the embedded server, a local Ollama or vLLM);
    anything else must be https, so a prompt never crosses a network in clear text.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise LLMConfigError(f"LLM base_url {url!r} must be an http(s) URL with a host, e.g. https://llm.example/v1")
    if scheme == "http" and not is_loopback_url(url):
        raise LLMConfigError(
            f"LLM base_url {url!r} uses plain http to a host that is not loopback: patient prompts leave this "
            "machine only over https (plain http is allowed to 127.0.0.1, ::1 or localhost only)")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    model: str  # as the endpoint reported it
    finish_reason: str | None = None
    elapsed_s: float = 0.0  # wall time of the successful request; 0 for a cache hit


@dataclass
class LLMUsage:
    """Counters of one LLMClient. ``calls`` counts requests answered by the endpoint (failed ones too)."""

    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0  # chat() calls that ended in an LLMError
    empty_answers: int = 0  # well-formed completions without text (allowed or not)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.generation_s if self.generation_s > 0 else 0.0


Messages = Sequence[Mapping[str, str]]


class LLMClient:
    """Chat with one OpenAI-compatible endpoint: retries, cache, counters, clear errors.

    ``sleep`` and ``rng`` are injectable so tests can check the backoff without waiting.
    Thread-safe: the counters are guarded, the cache has its own lock.
    """

    def __init__(
        self,
        config: LLMConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        if config.is_embedded:
            raise LLMConfigError("LLMClient needs a base_url; open_llm() starts the embedded server when none is set")
        if not config.model:
            raise LLMConfigError(
                f"no model named for the LLM endpoint {config.base_url}: set {ENV_MODEL} or 'model' in [llm]"
            )
        self.config = config
        self.usage = LLMUsage()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._turns = threading.BoundedSemaphore(config.max_concurrent) if config.max_concurrent else None
        # The client's own retries are off: ours are counted, classified and testable.
        # A loopback endpoint must not be sent through an HTTP proxy set in the environment.
        http_client = openai.DefaultHttpxClient(trust_env=False) if is_loopback_url(config.base_url) else None
        self._openai = openai.OpenAI(
            base_url=config.base_url,
            api_key=config.resolve_api_key(),
            timeout=config.timeout_s,
            max_retries=0,
            http_client=http_client,
        )

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._openai.close()
        if self._cache is not None:
            self._cache.close()

    def request_fields(self, sampling: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(OpenAI sampling fields, extra body) for this call: config defaults overlaid by ``sampling``."""
        fields = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        extra = dict(self.config.extra_body)
        for name, value in sampling.items():
            if name == "extra_body":
                extra.update(value or {})
            elif name in OPENAI_SAMPLING_FIELDS:
                fields[name] = value
            else:
                extra[name] = value
        fields = {k: v for k, v in fields.items() if v is not None}
        extra = {k: v for k, v in extra.items() if v is not None}
        return fields, extra

    def chat(self, messages: Messages | str, *, use_cache: bool = True, allow_empty: bool = False,
             wait_s: float | None = None, **sampling: Any) -> Completion:
        """One chat completion. ``messages`` is a list of {"role", "content"} (a str = one user message).

        ``sampling`` overrides the config: OpenAI fields (temperature, max_tokens, top_p, seed, stop, ...)
        go as such, anything else (repeat_penalty, top_k, ...) in the request body. Only deterministic
        requests (temperature 0, or a fixed seed) are cached: caching a random sample would silently
        return the same "sample" every time.

        An answer without text raises LLMEmptyAnswer, or with ``allow_empty`` comes back with text ""
        (for scorers, to which it names nothing); either way it is counted and never cached.

        With ``max_concurrent`` requests already out, the call waits its turn: as long as it takes, or
        at most ``wait_s`` seconds, then LLMBusy.
        """
        messages = _checked_messages(messages)
        fields, extra = self.request_fields(sampling)
        cacheable = use_cache and self._cache is not None and (fields.get("temperature") == 0 or "seed" in fields)
        key = None
        if cacheable:
            key = cache_key(
                {"base_url": self.config.cache_scope or self.config.base_url, "model": self.config.model,
                 "messages": messages, "sampling": fields, "extra_body": extra}
            )
            hit = self._cache.get(key)
            if hit is not None:
                with self._lock:
                    self.usage.cache_hits += 1
                return Completion(cached=True, elapsed_s=0.0, **hit)
        try:
            with self._turn(wait_s):
                completion = self._request(messages, fields, extra)
            if not completion.text.strip():
                with self._lock:
                    self.usage.empty_answers += 1
                if not allow_empty:
                    raise LLMEmptyAnswer(self.config.base_url, f"the answer is empty (finish_reason="
                                         f"{completion.finish_reason})", model=self.config.model)
                return completion
        except LLMError:
            with self._lock:
                self.usage.failures += 1
            raise
        if key is not None:
            self._cache.put(key, {
                "text": completion.text, "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens, "model": completion.model,
                "finish_reason": completion.finish_reason,
            })
        return completion

    @contextlib.contextmanager
    def _turn(self, wait_s: float | None) -> Iterator[None]:
        if self._turns is None:
            yield
            return
        if not self._turns.acquire(timeout=None if wait_s is None else max(wait_s, 0.0)):
            raise LLMBusy(self.config.base_url, f"no turn within {wait_s:g} s: {self.config.max_concurrent} "
                          f"request(s) already out and others waiting", model=self.config.model)
        try:
            yield
        finally:
            self._turns.release()

    def backoff_delay(self, retry: int, retry_after_s: float | None = None) -> float:
        """Wait before retry number ``retry`` (0-based): exponential, capped, with ±25% jitter so
        many sites restarting together do not retry in lockstep; a server's Retry-After wins (capped)."""
        if retry_after_s is not None and retry_after_s >= 0:
            return min(retry_after_s, self.config.backoff_max_s)
        base = min(self.config.backoff_s * 2**retry, self.config.backoff_max_s)
        return base * (0.75 + 0.5 * self._rng.random())

    def _request(self, messages: list[dict], fields: dict, extra: dict) -> Completion:
        attempts = self.config.max_retries + 1
        for attempt in range(1, attempts + 1):
            retry_after = None
            started = time.perf_counter()
            try:
                response = self._openai.chat.completions.create(
                    model=self.config.model, messages=messages, extra_body=extra or None, **fields
                )
            except openai.APIStatusError as exc:
                self._count_call()
                status = exc.status_code
                if not (status in RETRYABLE_STATUS or status >= 500):
                    raise LLMError(self.config.base_url, _describe_status(exc),
                                   model=self.config.model, attempts=attempt) from exc
                failure: Exception = exc
                retry_after = _retry_after_s(exc.response)
            except openai.APIConnectionError as exc:  # refused, reset, DNS, timeout
                failure = exc
            except (openai.APIResponseValidationError, ValueError) as exc:  # body is not the JSON it claims
                self._count_call()
                raise LLMResponseError(self.config.base_url, f"the answer is not valid JSON ({exc})",
                                       model=self.config.model, attempts=attempt) from exc
            else:
                elapsed = time.perf_counter() - started
                self._count_call()
                return self._completion_from(response, elapsed, attempt, fields.get("max_tokens"))
            if attempt == attempts:
                raise LLMUnavailable(self.config.base_url, self._describe_failure(failure),
                                     model=self.config.model, attempts=attempt) from failure
            with self._lock:
                self.usage.retries += 1
            self._sleep(self.backoff_delay(attempt - 1, retry_after))
        raise AssertionError("unreachable")

    def _count_call(self) -> None:
        with self._lock:
            self.usage.calls += 1

    def _completion_from(self, response: Any, elapsed_s: float, attempt: int, max_tokens: int | None) -> Completion:
        def malformed(what: str) -> LLMResponseError:
            return LLMResponseError(self.config.base_url, what, model=self.config.model, attempts=attempt)

        if isinstance(response, str):  # the client returns the raw text of a non-JSON answer
            raise malformed(f"the answer is not JSON: {_snippet(response)!r}")
        choices = getattr(response, "choices", None)
        if not choices:
            raise malformed("the answer has no choices")
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        finish_reason = getattr(choices[0], "finish_reason", None)
        if text is None:  # no content at all (e.g. a refusal or a tool call): an empty answer
            text = ""
        if not isinstance(text, str):
            raise malformed(f"the answer's content is not text: {_snippet(repr(text))}")
        if max_tokens and len(text) > max_tokens * MAX_CHARS_PER_TOKEN:
            raise malformed(f"the answer is {len(text):,} characters, more than max_tokens={max_tokens} can "
                            f"produce: the endpoint ignores max_tokens")
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        with self._lock:
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
            self.usage.generation_s += elapsed_s
        return Completion(
            text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached=False,
            model=str(getattr(response, "model", None) or self.config.model), finish_reason=finish_reason,
            elapsed_s=elapsed_s,
        )

    def _describe_failure(self, exc: Exception) -> str:
        if isinstance(exc, openai.APITimeoutError):
            return f"no answer within {self.config.timeout_s:g} s (timeout)"
        if isinstance(exc, openai.APIStatusError):
            return _describe_status(exc)
        chain = _cause_chain(exc)
        if any(isinstance(e, ConnectionRefusedError) for e in chain):
            return "connection refused (is the server running, and is the port right?)"
        if any(isinstance(e, TimeoutError) for e in chain):
            return f"no answer within {self.config.timeout_s:g} s (timeout)"
        innermost = chain[-1]
        # By name: the openai client's HTTP stack (httpx, or its fork httpx2) is its own business.
        if any(isinstance(e, ConnectionResetError) or type(e).__name__ == "RemoteProtocolError" for e in chain):
            return f"the server closed the connection before a complete answer ({innermost})"
        return f"cannot connect: {innermost}" if str(innermost) else f"cannot connect: {type(innermost).__name__}"


def _checked_messages(messages: Messages | str) -> list[dict]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be a mapping with string 'role' and 'content': {message!r}")
        checked.append(dict(message))
    if not checked:
        raise ValueError("no messages to send")
    return checked


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _describe_status(exc: openai.APIStatusError) -> str:
    status = exc.status_code
    hint = {
        401: "; the key was refused: set PMLM_LLM_API_KEY or OPENAI_API_KEY (or api_key_env in [llm])",
        403: "; the key may not use this model",
        404: "; check the model name and that the base URL ends in /v1",
    }.get(status, "")
    try:
        body = exc.response.text
    except Exception:  # a streamed or closed body has no text to show
        body = ""
    detail = f": {_snippet(body)}" if body.strip() else ""
    return f"HTTP {status}{detail}{hint}"


def _retry_after_s(response: Any) -> float | None:
    value = getattr(response, "headers", {}).get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "Completion", "LLMClient", "LLMConfig", "LLMConfigError", "LLMEmptyAnswer", "LLMError", "LLMResponseError",
    "LLMUnavailable", "LLMUsage", "is_loopback_url", "read_toml_table", "site_llm_config",
]
