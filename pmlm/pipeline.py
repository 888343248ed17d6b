"""The whole pipeline on a directory of records, and its evaluation: what `pmlm demo` and `pmlm evaluate` run.

Sites: one per sub-directory, or N sites by a stable hash split of the patients. Each site gets
WORKDIR/sites/<site>/ (site.json, keys, ledger, artifacts); the coordinator WORKDIR/coordinator/.
Phases A, B and C run through Flower (the ServerApp and ClientApp, in-process without Ray by default).
The evaluation then scores, on the sites' test splits, the recommender against its baselines and the
LLM's guidance for each prompt variant against what really happened next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pmlm.client.baselines import GestationalTiming, Popularity, timing_key
from pmlm.client.sites import discover_sites
from pmlm.common.atomic import write_atomic

GUIDANCE_VARIANTS = ("general", "summary_only", "self", "peer", "self_peer", "pmlm", "oracle")


@dataclass
class PipelineOptions:
    data: Path
    workdir: Path
    sites: int = 3
    epsilon: float = 3.0  # per site, whole budget (phase A's cap is half; B and C share what composition leaves)
    delta: float = 1e-5
    max_test_points: int = 40
    rounds: int = 3
    local_epochs: int = 1
    phase_b_rounds: int = 2
    prototypes: int = 6
    min_count: int = 20
    phase_c_rounds: int = 1  # one release of all its episodes: at a fixed budget, more rounds only add noise
    phase_c_points: int = 24  # the public nominal points a site, which the coordinator's step is normalised by
    phase_c_rate: float = 0.25  # each training patient's chance to take part in a phase C round (~22 at the sample's sites)
    max_tokens: int = 120
    profile: str = "obgyn"
    baselines_trained: bool = True  # centralized and local-only models (non-private) for the table
    llm: dict = field(default_factory=dict)
    progress: bool = True
    variants: tuple = GUIDANCE_VARIANTS  # which prompts the guidance evaluation scores
    curve: tuple = ()  # extra epsilons per site for the privacy-utility curve (each a full federated run)
    engine: str = "in-process"  # or "deployment": a local SuperLink and SuperNodes (TLS, node auth) on loopback


class PipelineError(RuntimeError):
    """The federated run did not complete; the message says which step failed and where its logs are."""


def _bar(desc: str, total: int, opts: PipelineOptions):
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not opts.progress, leave=False)


def prepare_sites(opts: PipelineOptions) -> dict[str, Path]:
    """Sites from sub-directories, or a stable split of one directory's patients into opts.sites sites."""
    found = discover_sites(opts.data)
    if len(found) > 1:
        return {name: path.resolve() for name, path in found.items()}
    from pmlm.client.ingest import RecordReader
    from pmlm.client.ingest.csv_events import gzipped_event_table

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


def run_config(opts: PipelineOptions) -> dict:
    return {
        "num-server-rounds": opts.rounds, "local-epochs": opts.local_epochs, "epsilon": opts.epsilon,
        "delta": opts.delta, "profile": opts.profile,
        "workdir": str(opts.workdir), "phases": "abc", "evaluate-each-round": False,
        "phase-b-rounds": opts.phase_b_rounds, "phase-b-prototypes": opts.prototypes,
        "phase-b-min-count": opts.min_count, "phase-c-rounds": opts.phase_c_rounds,
        "phase-c-points": opts.phase_c_points, "phase-c-rate": opts.phase_c_rate,
        "phase-c-max-tokens": opts.max_tokens,
    }


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
                bar = self.bars.get(phase) or self.bars.setdefault(phase, _bar(desc, total, self.opts))
                bar.update(done - bar.n)
                return
        if "Strategy execution finished" in message and "A" in self.bars:
            self._finish("A")

    def _finish(self, phase: str) -> None:
        bar = self.bars[phase]
        bar.update(bar.total - bar.n)
        bar.close()

    def __enter__(self):
        from flwr.common.logger import FLOWER_LOGGER

        FLOWER_LOGGER.addHandler(self)
        return self

    def __exit__(self, *exc):
        from flwr.common.logger import FLOWER_LOGGER

        FLOWER_LOGGER.removeHandler(self)
        for bar in self.bars.values():
            bar.close()


def run_federation(opts: PipelineOptions, sites: dict[str, Path]) -> dict:
    """Phases A, B, C through the Flower app: in this process (Ray-free grid) or on a local deployment."""
    from pmlm.client.site_config import SiteConfig

    nodes = []
    for name, path in sorted(sites.items()):
        site_dir = opts.workdir / "sites" / name
        # The operator of a simulated consortium is every site's operator too: it sets each site's policy.
        policy = {"epsilon_total": opts.epsilon, "delta": opts.delta}
        SiteConfig(name, str(path), opts.profile, dict(opts.llm), privacy=policy).save(site_dir)
        nodes.append({"data-dir": str(path), "site-id": name, "site-dir": str(site_dir),
                      "llm": json.dumps(opts.llm)})
    coordinator = opts.workdir / "coordinator"
    before = set(coordinator.glob("*.json")) if coordinator.exists() else set()
    started = time.perf_counter()
    if opts.engine == "deployment":
        _run_on_local_deployment(opts, sites)
    else:
        from pmlm.client.client_app import app as client_app
        from pmlm.server.in_process import run_in_process
        from pmlm.server.server_app import app as server_app

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
    from pmlm.deploy.local import LocalDeployment

    if opts.llm:  # SuperNodes read their LLM from node config; the launch scripts set only data and site
        raise PipelineError("--deployment runs with the embedded LLM; drop --llm-base-url/--llm-model")
    deployment = LocalDeployment(opts.workdir, sites, tls=True, run_config=run_config(opts))
    if not deployment.run():
        failed = "; ".join(c.name for c in deployment.checks if not c.ok)
        raise PipelineError(f"the local deployment failed ({failed}); logs in {deployment.logs}")


# --- evaluation -----------------------------------------------------------------------------------------


def _baseline_scores(ranker, examples, concepts: list[str]) -> np.ndarray:
    """A baseline's ranking as scores (for AUROC): counts from its table, 0 elsewhere."""
    col = {c: i for i, c in enumerate(concepts)}
    out = np.zeros((len(examples), len(concepts)), dtype=np.float32)
    for i, ex in enumerate(examples):
        if isinstance(ranker, GestationalTiming):
            counts = ranker.by_key.get(timing_key(ex)) or ranker.fallback.counts
        else:
            counts = ranker.counts
        for c, n in counts.items():
            if c in col:
                out[i, col[c]] = n
    return out


def _trained(examples, opts: PipelineOptions, profile, seed: int):
    """A non-private model trained on `examples` (centralized / local-only rows of the table)."""
    from pmlm.client.features import FeatureEncoder, PatientDataset
    from pmlm.common.phase_a import PhaseAConfig, new_model
    from pmlm.client.train import TrainSettings, train_local

    cfg = PhaseAConfig(profile=opts.profile)
    model = new_model(cfg, profile)
    encoder = FeatureEncoder(profile, cfg.max_history)
    dataset = PatientDataset([e for e in examples if e.split == "train"], encoder, cfg.points_per_patient, seed=seed)
    train_local(model, dataset, TrainSettings(epochs=max(2, opts.rounds * opts.local_epochs), seed=seed))
    return model, encoder


def evaluate_recommenders(site_examples: dict, site_dirs: dict, opts: PipelineOptions) -> dict:
    from pmlm.client.phase_a import load_global_model
    from pmlm.client.phase_b import embed_examples
    from pmlm.client.train import predict, ranking_metrics
    from pmlm.common.peer_profiles import PeerProfiles

    train = [e for exs in site_examples.values() for e in exs if e.split == "train"]
    test_by_site = {s: [e for e in exs if e.split == "test" and e.targets] for s, exs in site_examples.items()}
    test = [e for exs in test_by_site.values() for e in exs]
    first = next(iter(site_dirs.values()))
    model, encoder, _ = load_global_model(first)
    concepts = [c.id for c in encoder.profile.concepts]
    pick = lambda m: {"recall@5": m["recall@5"], "ndcg@5": m["ndcg@5"], "auroc": m["micro_auroc"]}  # noqa: E731
    table = {"federated_dp": pick(ranking_metrics(predict(model, test, encoder), test, encoder))}
    for name, ranker in (("popularity", Popularity(train)), ("timing", GestationalTiming(train))):
        table[name] = pick(ranking_metrics(_baseline_scores(ranker, test, concepts), test, encoder))
    peers = PeerProfiles.load(first / "phase_b" / "peer_profiles")
    emb = embed_examples(model, encoder, test)
    peer_scores = np.stack([peers.peer_rates(e)[0] for e in emb]) if len(emb) else np.zeros((0, len(concepts)))
    table["peer_profile"] = pick(ranking_metrics(peer_scores, test, encoder))
    if opts.baselines_trained:
        central, enc = _trained(train, opts, encoder.profile, seed=1)
        table["centralized"] = pick(ranking_metrics(predict(central, test, enc), test, enc))
        local = []
        for i, (site, exs) in enumerate(site_examples.items()):
            m, e = _trained(exs, opts, encoder.profile, seed=10 + i)
            local.append(pick(ranking_metrics(predict(m, test_by_site[site], e), test_by_site[site], e)))
        table["local_only"] = {k: float(np.nanmean([r[k] for r in local])) for k in local[0]}
    return table


def evaluate_guidance(site_examples: dict, site_dirs: dict, timelines: dict, opts: PipelineOptions, llm) -> dict:
    """Each prompt variant's answer scored against what really happened, on up to K test points."""
    from pmlm.client.assemble.assembler import PromptAssembler, SiteArtifacts
    from pmlm.client.reward import matcher_for, score_answer
    from pmlm.common.profiles import load_profile
    from pmlm.common.assemble.render import render, render_variant

    profile = load_profile(opts.profile)
    matcher = matcher_for(profile.name)
    assemblers = {s: PromptAssembler(SiteArtifacts.load(d, profile)) for s, d in site_dirs.items()}
    # Round-robin over sites, one point per test patient, so every site is represented.
    queues = {}
    for s, exs in site_examples.items():
        seen, q = set(), []
        for e in sorted((e for e in exs if e.split == "test" and e.targets), key=lambda e: (e.patient_id, e.t)):
            if e.patient_id not in seen:
                seen.add(e.patient_id)
                q.append(e)
        queues[s] = q
    points = []
    while len(points) < opts.max_test_points and any(queues.values()):
        for s in list(queues):
            if queues[s] and len(points) < opts.max_test_points:
                points.append((s, queues[s].pop(0)))
    scores = {v: [] for v in opts.variants}
    examples_out = []
    bar = _bar("evaluating guidance", len(points) * len(opts.variants), opts)
    for i, (site, ex) in enumerate(points):
        assembler = assemblers[site]
        ctx, state = assembler.context(ex, timelines.get((site, ex.patient_id)), with_oracle=True)
        shown = {}
        for variant in opts.variants:
            if variant == "pmlm":
                prompt = render(ctx.__class__(**{**ctx.__dict__, "oracle": []}), assembler.refined_params(state))
            else:
                prompt = render_variant(variant, ctx)
            answer = llm.chat(prompt.messages, max_tokens=opts.max_tokens, temperature=0.0, allow_empty=True)
            score = score_answer(answer.text, ex, matcher)
            scores[variant].append(score)
            shown[variant] = {"prompt": prompt.messages, "answer": answer.text, "f1": score.f1}
            bar.update(1)
        if i < 3:
            examples_out.append({"site": site, "targets": [profile.name_of(c) for c in ex.targets],
                                 "gestational_week": ex.gestational_week, "variants": shown})
    bar.close()

    def mean(values):
        values = [v for v in values if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    table = {v: {"precision": mean([s.precision for s in ss]), "recall": mean([s.recall for s in ss]),
                 "f1": mean([s.f1 for s in ss]), "risk_recall": mean([s.risk_recall for s in ss]),
                 "f1_interval": bootstrap_interval([s.f1 for s in ss]), "points": len(ss)}
             for v, ss in scores.items()}
    return {"table": table, "points": len(points), "examples": examples_out}


def bootstrap_interval(values: list[float], resamples: int = 2000, level: float = 0.95) -> list[float]:
    """A percentile bootstrap interval of the mean over the scored points (one point per test patient, so this
    resamples patients); fixed seed, so the same scores give the same interval."""
    values = np.asarray([v for v in values if not np.isnan(v)], dtype=float)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    means = np.random.default_rng(0).choice(values, size=(resamples, len(values))).mean(axis=1)
    return [float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))]


def privacy_summary(site_dirs: dict, opts: PipelineOptions) -> dict:
    from pmlm.common.privacy import SiteLedger

    out = {}
    for site, d in site_dirs.items():
        ledger = SiteLedger(d, site)
        spent = ledger.spent()
        phases = {p: round(ledger.spent(phase=p).pld, 4) for p in ledger.budget.shares}
        out[site] = {"epsilon": round(spent.pld, 4), "epsilon_rdp": round(spent.rdp, 4),
                     "budget": ledger.budget.epsilon_total, "by_phase": phases,
                     "releases": sum(1 for e in ledger.entries() if e.get("kind") == "release")}
    return {"delta": opts.delta, "sites": out}


def run_pipeline(opts: PipelineOptions, log=print) -> dict:
    started = time.perf_counter()
    opts.workdir = opts.workdir.resolve()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    records = load_consortium(opts)
    log(f"[1/4] sites: {', '.join(records.sites)}")
    report = run_pipeline_core(opts, records, log)
    return _with_curve(report, opts, log, started, records)


@dataclass
class Consortium:
    """The sites' records as read once: examples per site and the timelines prompts are assembled from."""

    sites: dict[str, Path]
    site_examples: dict[str, list]
    timelines: dict[tuple[str, str], object]
    patients: int


def load_consortium(opts: PipelineOptions) -> Consortium:
    from pmlm.client.sites import load_site
    from pmlm.common.profiles import load_profile

    sites = prepare_sites(opts)
    profile = load_profile(opts.profile)
    site_examples, timelines, patients = {}, {}, 0
    for name, path in sites.items():
        data, kept = load_site(name, path, profile, keep_timelines=True, progress=opts.progress)
        site_examples[name] = data.examples
        patients += data.patients
        timelines.update({(name, t.patient_id): t for t in kept})
    return Consortium(sites, site_examples, timelines, patients)


def quiet_flower() -> None:
    """Flower's per-message log and Opacus' per-round warnings would drown progress lines and figures."""
    import logging
    import warnings

    from flwr.common import logger as flwr_logger  # importing it sets Flower's logger to DEBUG: import first

    # The logger stays at INFO so PhaseProgress still hears the round markers; the console shows warnings only,
    # and nothing reaches the root logger's handlers (a library that configured them would print every line).
    flwr_logger.FLOWER_LOGGER.setLevel(logging.INFO)
    flwr_logger.FLOWER_LOGGER.propagate = False
    flwr_logger.console_handler.setLevel(logging.WARNING)
    # Phase A asks for no federated evaluation on purpose (the pipeline evaluates once, at the end).
    flwr_logger.FLOWER_LOGGER.addFilter(lambda record: "fraction_evaluate is set to 0.0" not in record.getMessage())
    # Repeated once per local round; the audit report states that Opacus secure mode is unavailable.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")


def run_pipeline_core(opts: PipelineOptions, records: Consortium, log=print) -> dict:
    """One federated run on the records read once (the curve's runs reuse them) and its evaluation."""
    from pmlm.client.llm import LLMConfig
    from pmlm.client.phase_c import site_llm

    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                       ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
        os.environ.setdefault(key, value)
    if opts.progress:  # the progress lines and bars say what happens
        quiet_flower()
    opts.workdir = opts.workdir.resolve()
    opts.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sites, site_examples, timelines = records.sites, records.site_examples, records.timelines
    log(f"[2/4] federated phases A (DP recommender), B (DP peer prototypes), C (RL prompt policy) through Flower"
        f" ({opts.engine})")
    timing = run_federation(opts, sites)
    site_dirs = {name: opts.workdir / "sites" / name for name in sites}
    log(f"      phase A {timing['phase_a']:.0f} s, phase B {timing['phase_b']:.0f} s, phase C {timing['phase_c']:.0f} s")
    log("[3/4] evaluating the recommender against its baselines")
    eval_started = time.perf_counter()
    recommender = evaluate_recommenders(site_examples, site_dirs, opts)
    log(f"[4/4] evaluating guidance on up to {opts.max_test_points} test points x {len(opts.variants)} prompts")
    llm = site_llm(opts.llm)
    guidance = evaluate_guidance(site_examples, site_dirs, timelines, opts, llm)
    config = LLMConfig.from_dict(opts.llm) if opts.llm else None
    usage = llm.usage
    report = {
        "data": {"patients": records.patients, "sites": len(sites),
                 "prediction_points": sum(len(v) for v in site_examples.values()),
                 "test_points": guidance["points"]},
        "privacy": privacy_summary(site_dirs, opts),
        "recommender": recommender,
        "guidance": guidance["table"],
        "llm": {"model": (config.model if config and config.model else "smollm2 (embedded SmolLM2-135M-Instruct)"),
                "calls": usage.calls, "cached": usage.cache_hits, "empty": usage.empty_answers},
        "runtime_s": {"total": round(time.perf_counter() - started, 1), "phase_a": timing["phase_a"],
                      "phase_b": timing["phase_b"], "phase_c": timing["phase_c"],
                      "evaluation": round(time.perf_counter() - eval_started, 1)},
        "examples": guidance["examples"],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items() if k != "llm"},
        "phases": timing["later"],
    }
    return report


def _with_curve(report: dict, opts: PipelineOptions, log, started: float, records: Consortium) -> dict:
    report["privacy_utility_curve"] = [{"epsilon": opts.epsilon, "f1": report["guidance"].get("pmlm", {}).get("f1")}]
    for eps in opts.curve:
        if eps == opts.epsilon:
            continue
        log(f"[curve] epsilon {eps} per site: another federated run, PMLM prompts only")
        extra = PipelineOptions(**{**opts.__dict__, "epsilon": eps, "workdir": opts.workdir / f"curve-eps-{eps:g}",
                                   "variants": ("pmlm",), "curve": (), "baselines_trained": False})
        sub = run_pipeline_core(extra, records, log)
        report["privacy_utility_curve"].append({"epsilon": eps, "f1": sub["guidance"]["pmlm"]["f1"]})
    report["runtime_s"]["total"] = round(time.perf_counter() - started, 1)
    return report
