"""`pmlm demo` and `pmlm evaluate` on a directory of records, in four modules read in the order they run:
`options` (what is asked), `federation` (phases A, B, C through Flower), `evaluation` (scoring the finished run),
`run` (the three put together, and the privacy-utility curve)."""

from pmlm.pipeline.options import PipelineError, PipelineOptions
from pmlm.pipeline.run import run_pipeline

__all__ = ["PipelineError", "PipelineOptions", "run_pipeline"]
