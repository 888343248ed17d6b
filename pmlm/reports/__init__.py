"""One module per report: audit.py renders the privacy audit (`pmlm audit report`: the sites' ledgers and
membership audits), demo.py the demo's results page (`pmlm demo`, `pmlm evaluate`). HTML and SVG only: the figures
come from the privacy core (common/privacy/) and the pipeline's evaluation (pmlm/pipeline/). screenshot.py takes
headless-browser screenshots of both, to look at them (tests/README.md); nothing imports it."""
