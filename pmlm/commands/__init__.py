"""Command groups of the `pmlm` CLI; each module has ``register(subparsers)``."""
