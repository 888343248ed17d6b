"""Command groups of the `pmlm` CLI; each module has ``register(subparsers)``.

The handlers import the pipeline, torch, Flower and the LLM client inside themselves, on purpose: every command
registers at start-up, and importing those for `pmlm --help` or `pmlm audit verify` would add seconds to each."""
