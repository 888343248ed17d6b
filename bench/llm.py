"""Bench: start-up time and generation speed of the embedded LLM (llama.cpp, SmolLM2-135M-Instruct Q4_1).

Two speeds, side by side in one run, at the sampling PMLM uses (temperature 0, repeat penalty 1.15):
end to end as PMLM sees it — generated tokens over request wall time, through the openai client,
prompt processing and HTTP included — and the decode speed — tokens after the first one over the time
after the first one, from a streamed request (what "generation speed" usually means). Target
(issue 6): >= 50 tokens/s on 2 cores. On shared machines wall-clock speed
depends on the neighbours, so the bench also prints the load average and the server's CPU time
(tokens per CPU-second does not). Run: .venv/bin/python bench/llm.py
"""

from __future__ import annotations

import argparse
import os
import time

import openai

from pmlm.client.llm import EmbeddedLLMServer, LLMClient, LLMConfig

TARGET_TOKENS_PER_S = 50.0
PROMPTS = [
    "List ten things a pregnant woman should discuss at her first prenatal visit, one line each.",
    "Explain, step by step, what happens during a glucose tolerance test in pregnancy.",
    "Write a short paragraph for a patient about why the Tdap vaccine is offered in pregnancy.",
    "Describe the warning signs of pre-eclampsia that should make a pregnant woman call her midwife.",
    "Give a weekly plan of gentle exercise for the second trimester of pregnancy.",
]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def decode_speed(base_url: str, max_tokens: int) -> float:
    """Streamed chunks after the first over the time after the first, summed over the prompts."""
    client = openai.OpenAI(base_url=base_url, api_key="no-key")
    chunks, seconds = 0, 0.0
    for prompt in PROMPTS:
        first = None
        n = 0
        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0.0, stream=True,
                                                extra_body={"repeat_penalty": 1.15})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                n += 1  # llama.cpp's server streams one token per chunk
                first = first or time.perf_counter()
        if first is not None and n > 1:
            chunks += n - 1
            seconds += time.perf_counter() - first
    return chunks / seconds if seconds else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    launched = time.perf_counter()
    with EmbeddedLLMServer(n_threads=args.threads) as server:
        print(f"embedded server: ready in {server.startup_s:.2f} s ({args.threads} threads, {os.cpu_count()} CPUs)")
        with LLMClient(server.config(LLMConfig(max_tokens=args.max_tokens))) as client:
            warm = client.chat("Hello.", max_tokens=4, use_cache=False)
            print(f"first answer {time.perf_counter() - launched:.2f} s after launch ({warm.elapsed_s:.2f} s request)")
            generated, seconds = 0, 0.0
            cpu_before = cpu_seconds(server.pid)
            for prompt in PROMPTS:
                answer = client.chat(prompt, use_cache=False)
                generated += answer.completion_tokens
                seconds += answer.elapsed_s
                print(f"  {answer.prompt_tokens:3d} prompt + {answer.completion_tokens:3d} generated tokens in "
                      f"{answer.elapsed_s:5.2f} s = {answer.completion_tokens / answer.elapsed_s:5.1f} tokens/s "
                      f"({answer.finish_reason})")
            cpu_used = cpu_seconds(server.pid) - cpu_before
            decode = decode_speed(server.base_url, args.max_tokens)
    speed = generated / seconds
    verdict = "meets" if speed >= TARGET_TOKENS_PER_S else "BELOW"
    print(f"generation speed: {speed:.1f} tokens/s over {len(PROMPTS)} prompts, {generated} tokens "
          f"({verdict} the {TARGET_TOKENS_PER_S:g} tokens/s target)")
    print(f"decode speed (streamed, after the first token): {decode:.1f} tokens/s "
          f"({'meets' if decode >= TARGET_TOKENS_PER_S else 'BELOW'} the target)")
    print(f"server CPU time: {cpu_used:.2f} s = {generated / cpu_used:.1f} tokens per CPU-second; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
