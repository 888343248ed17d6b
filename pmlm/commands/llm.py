"""`pmlm llm`: check the site's LLM endpoint, or ask it one question.

Without --base-url (and without PMLM_LLM_BASE_URL or base_url in the config) both use the embedded
llama.cpp server, started for the command and stopped after it.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

from pmlm.cli import CliError
from pmlm.common.atomic import write_atomic

CHECK_PROMPT = "In one sentence: why does a clinician check a patient's blood pressure?"


def register(subparsers) -> None:
    group = subparsers.add_parser("llm", help="the site's LLM: check the endpoint, ask it a question")
    commands = group.add_subparsers(dest="llm_command", metavar="SUBCOMMAND", required=True)

    check = commands.add_parser(
        "check", help="send one short prompt; print model, answer and speed",
        description="Send one short prompt to the site's LLM (the embedded server if none is configured) and "
                    "print the model, the answer and the generation speed. Exit 2 if it cannot answer.",
    )
    _add_endpoint_options(check)
    check.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default 48)")
    check.set_defaults(handler=run_check)

    ask = commands.add_parser(
        "ask", help="send one prompt; print the answer or write it to a file",
        description="Send one prompt to the site's LLM and print the answer (or write it to --answer-file, "
                    "completely or not at all). Uses the response cache when --cache-dir or the config sets one.",
    )
    ask.add_argument("prompt", help="the user message")
    ask.add_argument("--system", help="a system message sent before the prompt")
    ask.add_argument("--answer-file", type=Path, metavar="FILE",
                     help="write the answer to this file instead of stdout")
    # The old spelling: --out names a directory everywhere else.
    ask.add_argument("--out", dest="answer_file", type=Path, help=argparse.SUPPRESS)
    ask.add_argument("--cache-dir", type=Path, help="response cache directory (default: none, or the config's)")
    ask.add_argument("--max-tokens", type=int, help="tokens to generate (default: the config's)")
    _add_endpoint_options(ask)
    ask.set_defaults(handler=run_ask)


def _add_endpoint_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file whose [llm] table configures the endpoint")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. https://host:8000/v1 "
                                           "(plain http on loopback only; default: PMLM_LLM_BASE_URL, else the embedded server)")
    parser.add_argument("--model", help="model name at that endpoint (default: PMLM_LLM_MODEL)")
    parser.add_argument("--api-key-env", help="environment variable holding the key "
                                              "(default: PMLM_LLM_API_KEY, then OPENAI_API_KEY)")
    parser.add_argument("--timeout", type=float, dest="timeout_s", help="seconds to wait for an answer")


def _load_config(args, **extra):
    from pmlm.client.llm import LLMConfig, LLMConfigError

    try:
        return LLMConfig.load(args.config, base_url=args.base_url, model=args.model,
                              api_key_env=args.api_key_env, timeout_s=args.timeout_s, **extra)
    except LLMConfigError as exc:
        raise CliError(str(exc)) from None


def _connect(config, stack: ExitStack, out=None):
    """An LLMClient on ``stack``; starts the embedded server (and says so) when no endpoint is configured."""
    from pmlm.client.llm import EmbeddedLLMServer, LLMClient

    out = out or sys.stdout
    if config.is_embedded:
        server = stack.enter_context(EmbeddedLLMServer())
        print(f"endpoint: {server.base_url} (embedded llama.cpp server, ready in {server.startup_s:.1f} s)", file=out)
        config = server.config(config)
    else:
        print(f"endpoint: {config.base_url}", file=out)
    return stack.enter_context(LLMClient(config))


def run_check(args) -> int:
    from pmlm.client.llm import LLMConfigError, LLMError

    config = _load_config(args, max_tokens=args.max_tokens)
    try:
        with ExitStack() as stack:
            client = _connect(config, stack)
            answer = client.chat([{"role": "user", "content": CHECK_PROMPT}], use_cache=False)
    except (LLMError, LLMConfigError) as exc:
        raise CliError(str(exc)) from None
    speed = answer.completion_tokens / answer.elapsed_s if answer.elapsed_s > 0 else 0.0
    print(f"model: {answer.model}")
    print(f"answer: {' '.join(answer.text.split())}")
    print(f"tokens: {answer.prompt_tokens} prompt, {answer.completion_tokens} generated in {answer.elapsed_s:.2f} s "
          f"({speed:.1f} tokens/s)")
    return 0


def run_ask(args) -> int:
    from pmlm.client.llm import LLMConfigError, LLMError

    config = _load_config(args, max_tokens=args.max_tokens, cache_dir=args.cache_dir)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    try:
        with ExitStack() as stack:
            client = _connect(config, stack, out=sys.stderr)  # stdout carries only the answer
            answer = client.chat(messages)
    except (LLMError, LLMConfigError) as exc:
        raise CliError(str(exc)) from None
    if args.answer_file is None:
        print(answer.text)
    else:
        write_atomic(args.answer_file, answer.text + "\n")
    source = "cache" if answer.cached else f"{answer.completion_tokens} tokens in {answer.elapsed_s:.2f} s"
    print(f"({answer.model}, {source})", file=sys.stderr)
    return 0
