"""Process entry of the embedded LLM server: ``llama_cpp.server`` that exits as soon as PMLM is gone.

Run as a script (``python -P llama_server_child.py <llama_cpp.server args>``), not as a module, so
the child does not import PMLM or the openai client. PMLM holds the only write end of our stdin
pipe; when PMLM dies, even by SIGKILL, the kernel closes it and we read EOF. A PMLM worker created
by fork() inherits that write end and would keep the pipe open, so a changed parent pid (we were
re-parented) also ends us. Either way the server exits within about a second of PMLM.
"""

import os
import runpy
import select
import sys
import threading


def exit_when_parent_is_gone(parent_pid: int) -> None:
    while True:
        readable, _, _ = select.select([0], [], [], 1.0)
        if readable and not os.read(0, 4096):
            os._exit(0)  # EOF: nothing to flush, the kernel frees the model memory
        if os.getppid() != parent_pid:
            os._exit(0)


def evaluate_every_prompt_afresh() -> None:
    """Make a greedy answer depend on its prompt alone, not on the request before it.

    llama-cpp-python keeps the previous request's KV cache, reuses its common prefix and decodes only the
    rest; a prompt asked again is replayed as its last token alone. Those logits differ in the last digits
    from the batched evaluation of a fresh prompt, and a 135M model's greedy answer often changes with
    them: the same prompt asked twice in a row got two different answers 8 times in 12. PMLM compares
    prompt variants by their answers (the demo's evaluation, phase C's rewards), so each prompt is
    evaluated from the start, the same way every time; a few hundred prompt tokens cost well under a second.
    """
    from llama_cpp import llama  # here: the child process alone loads the optional native library

    generate = llama.Llama.generate

    def generate_from_scratch(self, tokens, *args, **kwargs):
        if kwargs.get("reset", True):
            self.reset()  # n_tokens 0: generate() then finds no prefix to reuse and evaluates every token
        return generate(self, tokens, *args, **kwargs)

    llama.Llama.generate = generate_from_scratch


def main() -> None:
    threading.Thread(target=exit_when_parent_is_gone, args=(os.getppid(),), daemon=True).start()
    evaluate_every_prompt_afresh()
    sys.argv = ["llama_cpp.server", *sys.argv[1:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
