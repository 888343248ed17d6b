"""On-site prompt assembly for one patient, from the site's stored global artifacts and her own record.

Used by `pmlm advise`, the evaluation pipeline and the gRPC PromptService. Each artifact is optional:
when one is missing the prompt goes without that section and `missing` says so plainly.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pmlm.client.adapt import site_recommender
from pmlm.client.assemble.context import build_context
from pmlm.client.assemble.self_informed import self_informed_features
from pmlm.client.assemble.stage import HerStage, LeftOut, her_stage, left_out_note
from pmlm.client.examples import Example, build_examples
from pmlm.client.ingest import RecordReader
from pmlm.client.phase_a import load_global_model
from pmlm.client.site_config import SiteConfig
from pmlm.common.assemble.policy import PolicyState, PromptPolicy
from pmlm.common.assemble.render import INITIAL, Prompt, PromptParams, render
from pmlm.common.atomic import write_atomic
from pmlm.common.peer_profiles import PeerProfiles, peer_facts
from pmlm.common.profiles import TaskProfile, load_profile
from pmlm.common.schema import Timeline
from pmlm.common.site_layout import PEER_PROFILES, POLICY, SITE_POLICY


def save_policy(policy: PromptPolicy, site_dir: Path, meta: dict, relative: Path = POLICY) -> Path:
    """Keep a prompt policy in the site directory: the consortium's at POLICY, the site-refined one at SITE_POLICY."""
    buffer = io.BytesIO()
    torch.save({"state_dict": policy.state_dict(), "embedding_dim": policy.embedding_dim, "meta": meta}, buffer)
    return write_atomic(Path(site_dir) / relative, buffer.getvalue())


def read_policy(site_dir: Path, relative: Path = POLICY) -> tuple[PromptPolicy, dict] | None:
    """(policy, its meta) stored at SITE_DIR/relative, or None when there is none."""
    path = Path(site_dir) / relative
    if not path.exists():
        return None
    blob = torch.load(path, weights_only=True)
    policy = PromptPolicy(int(blob["embedding_dim"]))
    policy.load_state_dict(blob["state_dict"])
    policy.eval()
    return policy, dict(blob.get("meta") or {})


def load_policy(site_dir: Path) -> PromptPolicy | None:
    """The consortium's (phase C's) policy stored at the site."""
    stored = read_policy(site_dir)
    return stored[0] if stored else None


def policy_file_digest(site_dir: Path) -> str | None:
    """SHA-256 of the stored consortium policy: a site-refined policy names the one it started from."""
    path = Path(site_dir) / POLICY
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


CONSORTIUM = "consortium"  # which policy chose her prompt: phase C's DP policy, shared by every site
SITE_REFINED = "site-refined"  # ... or the site's own refinement of it (client/refine.py), used only here


@dataclass
class SiteArtifacts:
    profile: TaskProfile
    model: object | None = None
    encoder: object | None = None
    peers: PeerProfiles | None = None
    policy: PromptPolicy | None = None  # the policy the site uses: its refined one when it has one, else the consortium's
    missing: list[str] = field(default_factory=list)
    consortium_policy: PromptPolicy | None = None
    policy_source: str | None = None  # SITE_REFINED, CONSORTIUM, or None (the initial prompt)
    policy_meta: dict = field(default_factory=dict)  # the used policy's stored meta (a refined one's validation figures)
    # Her own next events are ranked by the site's adapted recommender (client/adapt.py) when it has one; the
    # consortium model above still embeds her for peers and the policy, whose spaces were learned with it.
    recommender: object | None = None
    recommender_encoder: object | None = None
    recommender_site_only: bool = False

    @classmethod
    def load(cls, site_dir: Path, profile: TaskProfile) -> "SiteArtifacts":

        out = cls(profile)
        try:
            out.model, out.encoder, _ = load_global_model(site_dir)
            out.recommender, out.recommender_encoder, manifest = site_recommender(site_dir)
            out.recommender_site_only = bool(manifest.get("site_only"))
        except FileNotFoundError:
            out.missing.append("no global recommender at this site yet (phase A not run): "
                               "the self-informed predictions are left out")
        peers = Path(site_dir) / PEER_PROFILES
        if peers.with_suffix(".npz").exists():
            out.peers = PeerProfiles.load(peers)
        else:
            out.missing.append("no peer profiles at this site yet (phase B not run): the peer section is left out")
        try:
            stored = read_policy(site_dir)
        except (RuntimeError, KeyError) as exc:  # trained for another version of the prompt parameters
            out.missing.append(f"the stored policy does not fit this version's prompt parameters ({str(exc)[:80]}); "
                               "using the initial personalised prompt")
            return out
        if stored is None:
            out.missing.append("no refined-prompt policy yet (phase C not run): using the initial personalised "
                               "prompt")
            return out
        out.consortium_policy = out.policy = stored[0]
        out.policy_source, out.policy_meta = CONSORTIUM, stored[1]
        out._use_site_refined(Path(site_dir))
        return out

    def _use_site_refined(self, site_dir: Path) -> None:
        """The site's own refinement of the consortium policy, if it has one made from the current consortium policy."""
        try:
            refined = read_policy(site_dir, SITE_POLICY)
        except (RuntimeError, KeyError) as exc:
            self.missing.append(f"the site-refined policy does not fit this version's prompt parameters "
                                f"({str(exc)[:80]}); using the consortium policy")
            return
        if refined is None:
            return
        policy, meta = refined
        if meta.get("consortium_sha256") != policy_file_digest(site_dir):
            self.missing.append("the site-refined policy was refined from an earlier consortium policy: using the "
                                "consortium policy until the site refines the new one")
            return
        self.policy, self.policy_source, self.policy_meta = policy, SITE_REFINED, meta


@dataclass
class Assembled:
    prompt: Prompt
    state: PolicyState | None
    missing: list[str]
    policy: str | None = None  # which policy chose the prompt: SITE_REFINED, CONSORTIUM; None: given or initial params
    stage: HerStage | None = None  # her stage of pregnancy, and what cannot follow it
    left_out: list[LeftOut] = field(default_factory=list)  # predictions / peer facts impossible at her stage


class PromptAssembler:
    """Builds her context, policy state and prompt from the artifacts; nothing here leaves the site."""

    def __init__(self, artifacts: SiteArtifacts, top_k: int = 8):
        self.a = artifacts
        self.top_k = top_k

    def features(self, example: Example, timeline: Timeline | None):
        """(predictions, trajectory, peer facts, policy state, left out) for one prediction point: predictions and
        peer facts that cannot follow her stage of pregnancy are left out here, for advise, serve and evaluation."""

        a = self.a
        predictions, trajectory, facts, state, left_out = [], [], [], None, []
        stage = her_stage(a.profile, example)
        impossible = stage.impossible if stage else {}
        if a.model is not None:
            feats = self_informed_features(a.recommender, a.recommender_encoder, example, timeline, k=self.top_k,
                                           impossible=impossible)
            predictions = [(p.name, p.probability) for p in feats.predictions]
            trajectory = [c.text for c in feats.changes]
            left_out += [LeftOut(f"{p.name} ({p.probability:.0%})", "the patient's predictions", impossible[p.concept])
                         for p in feats.left_out]
            history, point, _ = a.encoder.encode([example])
            with torch.no_grad():
                embedding = a.model.embed(history, point)[0].numpy()
            probs = sorted((p.probability for p in feats.predictions), reverse=True)
            own_top = {p.concept for p in feats.predictions[:5]}
            agreement = 0.0
            if a.peers is not None:
                dropped: list[tuple[str, str]] = []
                facts = peer_facts(a.peers, embedding, a.profile, impossible=impossible, left_out=dropped)
                left_out += [LeftOut(fact, "similar patients (DP peer profile)", impossible[c]) for c, fact in dropped]
                peer_top = [c for c in a.peers.ranking(embedding, 5 + len(impossible)) if c not in impossible][:5]
                agreement = len(own_top & set(peer_top)) / 5
            state = PolicyState(embedding, top1_prob=probs[0] if probs else 0.0,
                                top5_mean_prob=float(np.mean(probs[:5])) if probs else 0.0,
                                peer_agreement=agreement, history_length=len(example.history),
                                gestational_week=example.gestational_week, weeks_postpartum=example.weeks_postpartum,
                                has_peers=bool(facts))
        return predictions, trajectory, facts, state, left_out

    def context(self, example: Example, timeline: Timeline | None, with_oracle: bool = False):
        predictions, trajectory, facts, state, left_out = self.features(example, timeline)
        ctx = build_context(example, self.a.profile, timeline, predictions=predictions, trajectory=trajectory,
                            peer_facts=facts, with_oracle=with_oracle)
        stage = her_stage(self.a.profile, example)
        ctx.stage = stage.label if stage else None
        ctx.left_out = [(x.text, x.source, x.why) for x in left_out]
        if stage and stage.ended_days_ago is not None:
            # Dated by the delivery or loss her record shows, which the record's pregnancy can outlast by weeks:
            # her summary must not call her pregnant after it, nor count weeks from a later date than "Recent:" does.
            ctx.gestational_week, ctx.weeks_postpartum = None, int(round(stage.ended_days_ago / 7))
        return ctx, state

    def refined_params(self, state: PolicyState | None, consortium: bool = False) -> PromptParams:
        """Her prompt's options as the site's policy picks them (its refined one when it has one), or with
        ``consortium`` as the consortium's policy picks them."""
        policy = self.a.consortium_policy if consortium else self.a.policy
        if policy is None or state is None:
            return INITIAL
        return policy.best(state)

    def assemble(self, example: Example, timeline: Timeline | None, question: str | None = None,
                 params: PromptParams | None = None) -> Assembled:
        ctx, state = self.context(example, timeline)
        chosen = params or self.refined_params(state)
        by = self.a.policy_source if params is None and state is not None else None
        stage = her_stage(self.a.profile, example)
        left_out = [LeftOut(*x) for x in ctx.left_out]
        note = left_out_note(stage, left_out) if stage else None
        return Assembled(render(ctx, chosen, question), state, list(self.a.missing) + ([note] if note else []), by,
                         stage, left_out)


def find_patient(config: SiteConfig, patient_id: str, profile: TaskProfile) -> tuple[Timeline, Example]:
    """Her timeline and her latest prediction point; clear errors when she is absent or has none."""
    def hers(timeline: Timeline) -> range:  # only her notes keep their text, so only hers are scrubbed
        return range(len(timeline.events) if timeline.patient_id == patient_id else 0)

    for timeline in RecordReader(Path(config.data_dir), note_text=hers):
        if timeline.patient_id == patient_id:
            examples = build_examples(timeline, profile, site=config.site_id)
            if not examples:
                scope = profile.scope.describe()
                raise LookupError(f"patient {patient_id} has no {profile.name} prediction point on record "
                                  f"(PMLM advises at {', '.join(profile.name_of(p) for p in sorted(profile.prediction_points))}"
                                  + (f"; {scope})" if scope else ")"))
            return timeline, examples[-1]
    raise LookupError(f"patient {patient_id!r} not found in {config.data_dir}")


def site_assembler(site_dir: Path) -> tuple[SiteConfig, PromptAssembler]:
    config = SiteConfig.load(site_dir)
    profile = load_profile(config.profile)
    return config, PromptAssembler(SiteArtifacts.load(site_dir, profile))


def describe_sources(prompt: Prompt) -> str:
    lines = []
    for fact, source in prompt.sources:
        lines.append(f"  [{source}] {fact}")
    return "\n".join(lines)
