"""Scoring a finished run on the sites' test splits: the recommender against its baselines, the LLM's guidance for
each prompt variant against what really happened next, and what each site spent of its privacy budget."""

from __future__ import annotations

import numpy as np

from pmlm.client.assemble.assembler import PromptAssembler, SiteArtifacts
from pmlm.client.assemble.check import check_answer, record_concepts
from pmlm.client.assemble.stage import her_stage
from pmlm.client.baselines import Popularity, TimingFloor, timing_key
from pmlm.client.features import FeatureEncoder, PatientDataset
from pmlm.client.phase_a import load_global_model
from pmlm.client.phase_b import embed_examples
from pmlm.client.reward import matcher_for, score_answer
from pmlm.client.train import TrainSettings, predict, ranking_metrics, train_local
from pmlm.common.assemble.render import render, render_variant
from pmlm.common.metrics import bootstrap_interval, paired_interval
from pmlm.common.peer_profiles import PeerProfiles
from pmlm.common.phase_a import PhaseAConfig, new_model
from pmlm.common.privacy import SiteLedger
from pmlm.common.profiles import load_profile
from pmlm.common.site_layout import PEER_PROFILES
from pmlm.pipeline.options import PipelineOptions, progress_bar
from pmlm.pipeline.site_recommenders import evaluate_site_recommenders


def _baseline_scores(ranker, examples, concepts: list[str]) -> np.ndarray:
    """A baseline's ranking as scores (for AUROC): counts from its table, 0 elsewhere."""
    col = {c: i for i, c in enumerate(concepts)}
    out = np.zeros((len(examples), len(concepts)), dtype=np.float32)
    for i, ex in enumerate(examples):
        if isinstance(ranker, TimingFloor):
            counts = ranker.by_key.get(timing_key(ex)) or ranker.fallback.counts
        else:
            counts = ranker.counts
        for c, n in counts.items():
            if c in col:
                out[i, col[c]] = n
    return out


def _trained(examples, opts: PipelineOptions, profile, seed: int):
    """A non-private model trained on `examples` (centralized / local-only rows of the table)."""

    cfg = PhaseAConfig(profile=opts.profile)
    model = new_model(cfg, profile)
    encoder = FeatureEncoder(profile, cfg.max_history)
    dataset = PatientDataset([e for e in examples if e.split == "train"], encoder, cfg.points_per_patient, seed=seed)
    train_local(model, dataset, TrainSettings(epochs=max(2, opts.rounds * opts.local_epochs), seed=seed))
    return model, encoder


def evaluate_recommenders(site_examples: dict, site_dirs: dict, opts: PipelineOptions) -> tuple[dict, dict | None]:
    """The pooled table (the consortium's model against its floors and reference models) and, with the trained
    reference models, the per-site table of what each site could use: local_only, federated_dp, adapted."""

    train = [e for exs in site_examples.values() for e in exs if e.split == "train"]
    test_by_site = {s: [e for e in exs if e.split == "test" and e.targets] for s, exs in site_examples.items()}
    test = [e for exs in test_by_site.values() for e in exs]
    first = next(iter(site_dirs.values()))
    model, encoder, _ = load_global_model(first)
    concepts = [c.id for c in encoder.profile.concepts]
    pick = lambda m: {"recall@5": m["recall@5"], "ndcg@5": m["ndcg@5"], "auroc": m["micro_auroc"]}  # noqa: E731
    table = {"federated_dp": pick(ranking_metrics(predict(model, test, encoder), test, encoder))}
    for name, ranker in (("popularity", Popularity(train)), ("timing", TimingFloor(train))):
        table[name] = pick(ranking_metrics(_baseline_scores(ranker, test, concepts), test, encoder))
    peers = PeerProfiles.load(first / PEER_PROFILES)
    emb = embed_examples(model, encoder, test)
    peer_scores = np.stack([peers.peer_rates(e)[0] for e in emb]) if len(emb) else np.zeros((0, len(concepts)))
    table["peer_profile"] = pick(ranking_metrics(peer_scores, test, encoder))
    if opts.baselines_trained:
        central, enc = _trained(train, opts, encoder.profile, seed=1)
        table["centralized"] = pick(ranking_metrics(predict(central, test, enc), test, enc))
        local, models = [], {}
        for i, (site, exs) in enumerate(site_examples.items()):
            m, e = models[site] = _trained(exs, opts, encoder.profile, seed=10 + i)
            local.append(pick(ranking_metrics(predict(m, test_by_site[site], e), test_by_site[site], e)))
        table["local_only"] = {k: float(np.nanmean([r[k] for r in local])) for k in local[0]}
        return table, evaluate_site_recommenders(site_examples, site_dirs, models)
    return table, None


def _reading(profile, ex) -> str:
    """The point's reading in words for a profile without stages (e.g. "age 62"), for the report's headings;
    a profile with stages heads each example with her stage (ctx.stage)."""
    if profile.stage_labels or ex.age_years is None:
        return ""
    return f"{profile.wording.stage_label} {ex.age_years:.0f}"


def evaluate_guidance(site_examples: dict, site_dirs: dict, timelines: dict, opts: PipelineOptions, llms) -> dict:
    """Each prompt variant's answer scored against what really happened, on up to K test points.
    llms: each site's LLM client (site -> client), or one client for every site."""
    llm_of = llms.__getitem__ if isinstance(llms, dict) else (lambda site: llms)
    profile = load_profile(opts.profile)
    matcher = matcher_for(profile.name)
    assemblers = {s: PromptAssembler(SiteArtifacts.load(d, profile)) for s, d in site_dirs.items()}
    points = _test_points(site_examples, opts.max_test_points, opts.points_per_patient)
    scores = {v: [] for v in opts.variants}
    examples_out = []
    bar = progress_bar("evaluating guidance", len(points) * len(opts.variants), opts)
    for i, (site, ex) in enumerate(points):
        assembler = assemblers[site]
        ctx, state = assembler.context(ex, timelines.get((site, ex.patient_id)), with_oracle=True)
        blind = ctx.__class__(**{**ctx.__dict__, "oracle": []})  # PMLM's prompts never see what happened next
        shown, prompts = {}, {}
        for variant in opts.variants:
            if variant == "pmlm":  # what the site really uses: its refined policy when it kept one
                prompt = render(blind, assembler.refined_params(state))
            elif variant == "pmlm_consortium":  # the consortium's DP policy, as every site received it
                prompt = render(blind, assembler.refined_params(state, consortium=True))
            else:
                prompt = render_variant(variant, ctx)
            answer = llm_of(site).chat(prompt.messages, max_tokens=opts.max_tokens, temperature=0.0, allow_empty=True)
            score = score_answer(answer.text, ex, matcher)
            scores[variant].append(score)
            shown[variant] = {"prompt": prompt.messages, "answer": answer.text, "f1": score.f1}
            prompts[variant] = prompt
            bar.update(1)
        if i < 3:
            # The report's examples show each answer as `pmlm advise` would: its items checked against her prompt,
            # her record and her stage (the F1 above scores the answer as the LLM wrote it).
            stage = her_stage(profile, ex)
            for variant, v in shown.items():
                check = check_answer(v["answer"], prompts[variant], matcher, record_concepts(ex),
                                     stage.impossible if stage else {})
                v["check"] = [{"item": c.text, "reasons": c.reasons, "removed": c.removed} for c in check.flagged]
            # A gestational week only where the profile has pregnancies: a chronic report says nothing of one.
            week = {"gestational_week": ex.gestational_week} if profile.pregnancy_start else {}
            examples_out.append({"site": site, "targets": [profile.name_of(c) for c in ex.targets], **week,
                                 "stage": ctx.stage or _reading(profile, ex), "variants": shown})
    bar.close()
    sites = [site for site, _ in points]
    patients = [(site, ex.patient_id) for site, ex in points]  # the bootstrap's unit: a patient, not a point
    by_site = {site: guidance_table({v: [sc for sc, s in zip(ss, sites) if s == site] for v, ss in scores.items()},
                                    [p for p in patients if p[0] == site])
               for site in site_dirs}
    return {"table": guidance_table(scores, patients), "by_site": by_site,
            "paired": paired_guidance(scores, sites, patients), "points": len(points),
            "patients": len(set(patients)), "examples": examples_out}


def _test_points(site_examples: dict, limit: int, per_patient: int) -> list:
    """Up to `limit` (site, example) test points with targets: up to `per_patient` a patient, spread over her
    record, taken round-robin over sites and then over patients (every test patient's first point before anyone's
    second), so every site and as many patients as possible are represented. Several points a patient give a
    profile with few test patients (chronic) enough points; intervals still resample patients."""
    queues = {}
    for s, exs in site_examples.items():
        by_patient: dict[str, list] = {}
        for e in sorted((e for e in exs if e.split == "test" and e.targets), key=lambda e: (e.patient_id, e.t)):
            by_patient.setdefault(e.patient_id, []).append(e)
        chosen = [_spread(own, per_patient) for own in by_patient.values()]
        queues[s] = [own[k] for k in range(per_patient) for own in chosen if k < len(own)]
    points = []
    while len(points) < limit and any(queues.values()):
        for s in list(queues):
            if queues[s] and len(points) < limit:
                points.append((s, queues[s].pop(0)))
    return points


def _spread(points: list, n: int) -> list:
    """n of a patient's points in time order, evenly spaced from her first (one point: her first)."""
    if len(points) <= n:
        return points
    if n == 1:
        return points[:1]
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


# The comparisons a site cares about: what it uses against the initial prompt, against the consortium's policy
# alone, and against asking the LLM with no patient context at all.
GUIDANCE_PAIRS = (("pmlm", "self_peer"), ("pmlm", "pmlm_consortium"), ("pmlm", "general"))


def guidance_table(scores: dict[str, list], patients: list | None = None) -> dict:
    """Each variant's mean scores and F1's bootstrap interval over patients (`patients`: each point's patient;
    None: one point a patient)."""

    def mean(values):
        values = [v for v in values if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    return {v: {"precision": mean([s.precision for s in ss]), "recall": mean([s.recall for s in ss]),
                "f1": mean([s.f1 for s in ss]), "risk_recall": mean([s.risk_recall for s in ss]),
                "f1_interval": bootstrap_interval([s.f1 for s in ss], patients), "points": len(ss)}
            for v, ss in scores.items()}


def paired_guidance(scores: dict[str, list], sites: list[str], patients: list | None = None) -> dict:
    """Each pair's F1 difference and ratio with paired bootstrap intervals over patients, pooled and per site."""
    patients = list(range(len(sites))) if patients is None else patients
    out = {}
    for a, b in GUIDANCE_PAIRS:
        if a not in scores or b not in scores:
            continue
        fa, fb = [s.f1 for s in scores[a]], [s.f1 for s in scores[b]]
        pooled = paired_interval(fa, fb, patients)
        pooled["by_site"] = {site: paired_interval(*([v for v, s in zip(seq, sites) if s == site]
                                                     for seq in (fa, fb, patients)))
                             for site in dict.fromkeys(sites)}
        out[f"{a}_vs_{b}"] = pooled
    return out


def privacy_summary(site_dirs: dict, opts: PipelineOptions) -> dict:

    out = {}
    for site, d in site_dirs.items():
        ledger = SiteLedger(d, site)
        spent = ledger.spent()
        phases = {p: round(ledger.spent(phase=p).pld, 4) for p in ledger.budget.shares}
        out[site] = {"epsilon": round(spent.pld, 4), "epsilon_rdp": round(spent.rdp, 4),
                     "budget": ledger.budget.epsilon_total, "by_phase": phases,
                     "releases": sum(1 for e in ledger.entries() if e.get("kind") == "release")}
    return {"delta": opts.delta, "sites": out}
