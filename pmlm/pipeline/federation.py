"""Running phases A, B and C through Flower for a consortium on this machine: the sites' directories and
policies, the in-process engine or a local deployment, and a progress bar per phase read from the coordinator's log.

Sites: one per sub-directory, or N sites by a stable hash split of the patients. Each site gets
WORKDIR/sites/<site>/ (site.json, keys, ledger, artifacts); the coordinator WORKDIR/coordinator/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from pathlib import Path

from flwr.common import logger as flwr_logger
from tqdm import tqdm

from pmlm import logs
from pmlm.client.client_app import app as client_app
from pmlm.client.ingest import RecordReader
from pmlm.client.ingest.csv_events import gzipped_event_table
from pmlm.client.site_config import SiteConfig
from pmlm.client.sites import discover_sites
from pmlm.common.atomic import write_atomic
from pmlm.deploy.local import LocalDeployment
from pmlm.pipeline.options import PipelineError, PipelineOptions, progress_bar, run_config, site_llm_settings
from pmlm.server.in_process import run_in_process
from pmlm.server.server_app import app as server_app


def prepare_sites(opts: PipelineOptions) -> dict[str, Path]:
    """Sites from sub-directories, or a stable split of one directory's patients into opts.sites sites."""
    found = discover_sites(opts.data)
    if len(found) > 1:
        return {name: path.resolve() for name, path in found.items()}

    names = [f"site_{i + 1}" for i in range(opts.sites)]
    buckets: dict[str, list] = {n: [] for n in names}
    for timeline in RecordReader(next(iter(found.values()))):
        h = int(hashlib.sha256(timeline.patient_id.encode()).hexdigest()[8:16], 16)
        buckets[names[h % opts.sites]].append(timeline)
    out = {}
    for name, timelines in buckets.items():
        folder = opts.workdir / "data" / name
        write_atomic(folder / "events.csv.gz", gzipped_event_table(timelines)[0])
        out[name] = folder.resolve()
    return out


class PhaseProgress(logging.Handler):
    """A progress bar per phase, driven by the round markers the ServerApp logs (Flower's FedAvg rounds in
    phase A, PMLM's own lines in phases B and C), so the in-process run shows where it is."""

    # (phase, pattern, bar title, (done, total) from the match): a phase's bar opens when the phase starts.
    PATTERNS = (
        ("A", re.compile(r"\[ROUND (\d+)/(\d+)\]"), "phase A: DP recommender rounds",
         lambda m: (int(m[1]) - 1, int(m[2]))),  # Flower logs a round as it starts
        ("B", re.compile(r"\[PMLM phase B\] DP k-means, \d+ prototypes, (\d+) rounds"), "phase B: DP peer releases",
         lambda m: (0, int(m[1]) + 1)),
        ("B", re.compile(r"\[PMLM phase B\] release (\d+)/(\d+)"), "phase B: DP peer releases",
         lambda m: (int(m[1]), int(m[2]))),
        ("C", re.compile(r"\[PMLM phase C\] RL prompt policy, (\d+) rounds"), "phase C: RL prompt rounds",
         lambda m: (0, int(m[1]))),
        ("C", re.compile(r"\[PMLM phase C\] round (\d+)/(\d+)"), "phase C: RL prompt rounds",
         lambda m: (int(m[1]), int(m[2]))),
    )

    def __init__(self, opts: PipelineOptions):
        super().__init__(logging.INFO)
        self.opts = opts
        self.bars: dict[str, tqdm] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for phase, pattern, desc, progress in self.PATTERNS:
            if m := pattern.search(message):
                done, total = progress(m)
                for other in [k for k in self.bars if k < phase]:
                    self._finish(other)
                bar = self.bars.get(phase) or self.bars.setdefault(phase, progress_bar(desc, total, self.opts))
                bar.update(done - bar.n)
                return
        if "Strategy execution finished" in message and "A" in self.bars:
            self._finish("A")

    def _finish(self, phase: str) -> None:
        bar = self.bars[phase]
        bar.update(bar.total - bar.n)
        bar.close()

    def __enter__(self):

        flwr_logger.FLOWER_LOGGER.addHandler(self)
        return self

    def __exit__(self, *exc):

        flwr_logger.FLOWER_LOGGER.removeHandler(self)
        for bar in self.bars.values():
            bar.close()


def run_federation(opts: PipelineOptions, sites: dict[str, Path]) -> dict:
    """Phases A, B, C through the Flower app: in this process (Ray-free grid) or on a local deployment."""

    nodes = []
    unknown = sorted(set(opts.receive_only) - set(sites))
    if unknown:
        raise PipelineError(f"receive-only sites {unknown} are not in the consortium (its sites: {sorted(sites)})")
    if len(set(sites) - set(opts.receive_only)) < 1:
        raise PipelineError("every site receives phase A without training it: at least one site must train")
    for name, path in sorted(sites.items()):
        site_dir = opts.workdir / "sites" / name
        # The operator of a simulated consortium is every site's operator too: it sets each site's policy.
        policy = {"epsilon_total": opts.epsilon, "delta": opts.delta}
        if name in opts.receive_only:
            policy["phase_a_train"] = False
        llm = site_llm_settings(opts, name)
        SiteConfig(name, str(path), opts.profile, llm, privacy=policy).save(site_dir)
        nodes.append({"data-dir": str(path), "site-id": name, "site-dir": str(site_dir), "llm": json.dumps(llm)})
    coordinator = opts.workdir / "coordinator"
    before = set(coordinator.glob("*.json")) if coordinator.exists() else set()
    started = time.perf_counter()
    if opts.engine == "deployment":
        _run_on_local_deployment(opts, sites)
    else:

        with PhaseProgress(opts):
            run_in_process(server_app, client_app, nodes, run_config(opts))
    total = time.perf_counter() - started
    written = sorted(set(coordinator.glob("*-phases-bc.json")) - before)
    later = json.loads(written[-1].read_text()) if written else {}
    b = later.get("phase_b", {}).get("seconds", 0.0)
    c = later.get("phase_c", {}).get("seconds", 0.0)
    return {"phase_a": round(total - b - c, 1), "phase_b": b, "phase_c": c, "later": later}


def _run_on_local_deployment(opts: PipelineOptions, sites: dict[str, Path]) -> None:
    """SuperLink and one SuperNode per site on loopback with TLS and node authentication, the app run by
    `flwr run`; site directories land where the in-process engine puts them (workdir/sites/<site>)."""

    if opts.llm:  # SuperNodes read their LLM from node config; the launch scripts set only data and site
        raise PipelineError("--deployment runs with the embedded LLM; drop --llm-base-url/--llm-model")
    deployment = LocalDeployment(opts.workdir, sites, tls=True, run_config=run_config(opts))
    if not deployment.run():
        failed = "; ".join(c.name for c in deployment.checks if not c.ok)
        raise PipelineError(f"the local deployment failed ({failed}); logs in {deployment.logs}")


def _no_evaluate_note(record) -> bool:  # named, so addFilter does not stack copies across the curve's runs
    # Phase A asks for no federated evaluation on purpose (the pipeline evaluates once, at the end).
    return "fraction_evaluate is set to 0.0" not in record.getMessage()


def quiet_flower() -> None:
    """Flower's per-message log and Opacus' per-round warnings would drown progress lines and figures."""
    # Flower's console shows errors only unless `pmlm --verbose`; its logger stays at INFO so PhaseProgress hears
    # the round markers, does not propagate, and writes to the command's pmlm.log (pmlm/logs.py).
    logs.tame_flower()
    flwr_logger.FLOWER_LOGGER.addFilter(_no_evaluate_note)
    # Repeated once per local round; the audit report states that Opacus secure mode is unavailable.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
