"""The hospital's Flower ClientApp: every handler of phases A, B and C, messages in, calls into the site's
Flower-free phase code out (client/phase_a.py, phase_b.py, phase_c.py).

Which site this node is: in a deployment, the SuperNode's node config names it
(`--node-config "data-dir=/data/ehr site-dir=/srv/pmlm/site"`); in simulation, the run config's
`data-root` (a consortium folder) and `workdir` plus the node's `partition-id` pick one hospital.
Every message of phases B and C names the run through phase A's config record, so the node finds its site
exactly as phase A did, and the site's policy checks it as it checks phase A.

What leaves the site: in phase A the DP-trained weights (ArrayRecord) and public figures (MetricRecord: a FedAvg
weight of 1, the public step count, the cumulative epsilon and noise multiplier), or, where the site's policy
receives phase A without training (`phase_a_train: false`), a reply with no weights at all; in phases B and C one noisy
array per release and the ledger entry that paid for it (masked under SecAgg+; plain releases only where the
site's policy allows them). Nothing per patient, no exact count (the README's threat model lists every field).
Once phase A's model is final, `store_model` also adapts it to the site's own records (client/adapt.py): a
site-only artifact, never sent, no ledger entry; the reply stays the constant acknowledgement.
Every reply of every handler is first recorded in the site's egress log (client/egress.py).

The site's own policy (client/site_policy.py) decides what it answers: a request outside it raises
PolicyRefusal, which `policy_guard` records as a signed ledger line before the error reply leaves.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from pmlm.client.egress import record_egress
from pmlm.client.secure_sum import attach_secure_sum, register_vector_task, secure_sum_key_exchange
from pmlm.client.site_policy import PolicyRefusal, SitePolicy
from pmlm.client.sites import SiteLocation, site_location
from pmlm.common.phase_a import RECEIVE_ONLY
from pmlm.common.phase_a import RECORD as PHASE_A_RECORD
from pmlm.common.phase_a import PhaseAConfig, pack_model, unpack_model
from pmlm.common.phase_b import VECTOR_TASK as PHASE_B_TASK
from pmlm.common.phase_b import PhaseBConfig, profiles_from_message
from pmlm.common.phase_c import VECTOR_TASK as PHASE_C_TASK
from pmlm.common.phase_c import PhaseCConfig
from pmlm.common.privacy.kept import GroupChanged
from pmlm.common.privacy.ledger import SiteLedger
from pmlm.common.run_config import run_config_of

# The site's phase code imports torch and Opacus (about 5 s, 10-15 s with three sites starting on two cores). The
# Deployment Engine starts a fresh ClientApp process for every message, and most messages (SecAgg+'s key and share
# stages, the stores, the ledger copy) need none of it: each handler imports the phase code it calls.
if TYPE_CHECKING:
    import torch

    from pmlm.client.phase_a import SitePhaseA
    from pmlm.client.phase_b import SitePhaseB
    from pmlm.client.phase_c import SitePhaseC

PLAN_RECORD = "phase-a-plan"
ADAPT_KEY = "adapt-recommender"  # node config (the site operator's): "false" keeps the consortium model as it is
_SITES: dict[tuple[str, str], SitePhaseA] = {}  # per node process: (site dir, run) -> loaded site
_B: dict[tuple[str, str], tuple[SitePhaseA, SitePhaseB]] = {}  # each with the phase-A site it was built from
_C: dict[tuple[str, str], tuple[SitePhaseA, SitePhaseC]] = {}


def forget_runs() -> None:
    """Drop every loaded site (a long-lived site worker calls it when a new run starts)."""
    _SITES.clear()
    _B.clear()
    _C.clear()


# Every handler runs inside the egress log's mod; app-wide mods are the outermost, so it sees the final reply.
app = ClientApp(mods=[record_egress])


def asks_hospital_dp(config) -> bool:
    """The coordinator asked for hospital-level DP (Flower's client-side fixed clipping)."""
    return config is not None and "clipping_norm" in config


def hospital_dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side fixed clipping, when the server asked for hospital-level DP."""
    if asks_hospital_dp(msg.content.config_records.get("config")):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def site_policy(context: Context) -> tuple[SiteLocation, SitePolicy]:
    """Which hospital this node is, and its own privacy policy (node config and site.json, never the run)."""
    where = site_location(context.node_config, run_config_of(context.run_config))
    return where, SitePolicy.load(where.site_dir, context.node_config)


def site_for(context: Context, cfg: PhaseAConfig) -> SitePhaseA:
    """The site's phase-A state for this run; raises PolicyRefusal for a run outside the site's policy."""
    from pmlm.client.phase_a import SitePhaseA

    where, policy = site_policy(context)
    key = (str(where.site_dir), policy.check_run_id(cfg.run_name))
    kept = _SITES.get(key)
    if kept is None or kept.policy != policy:
        # A policy the operator changed holds from the next message on, also in a long-lived site worker (a fresh
        # process per message always read it anew): the run's caps and budget are worked out again, and its
        # phase B and C sites, which hold them, are rebuilt from what the site directory keeps.
        _SITES[key] = SitePhaseA(where.site_id, where.data_dir, where.site_dir, cfg, policy=policy)
    return _SITES[key]


def site_checked(context: Context, cfg: PhaseAConfig) -> tuple[SiteLocation, SitePolicy]:
    """Which hospital this node is, for a message that reads no record: the run passes the same policy checks as
    in site_for (its id, its ε and δ), without loading the site's records."""
    where, policy = site_policy(context)
    policy.check_run_id(cfg.run_name)
    policy.run_caps(cfg.phase_a_epsilon, cfg.epsilon_total, cfg.delta)
    return where, policy


def record_refusal(context: Context, phase: str, request: dict, refusal: PolicyRefusal) -> dict:
    """The refusal as a signed line in the site's ledger (nothing was computed, nothing else leaves)."""
    where, policy = site_policy(context)
    ledger = SiteLedger(where.site_dir, where.site_id, policy.budget())
    round_ = request.get("server-round", request.get("round"))
    return ledger.refuse_request(phase, request, refusal.limit, str(refusal),
                                 round=round_ if isinstance(round_, int) and round_ >= 0 else None)


def request_summary(config) -> dict:
    """What the coordinator asked for, as the ledger keeps it: its scalar settings (long text cut short)."""
    out = {}
    for key, value in dict(config or {}).items():
        if isinstance(value, bool) or isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            out[str(key)] = value
        elif isinstance(value, str):
            out[str(key)] = value[:200]
    return out


def policy_guard(phase: str):
    """Wrap a handler: a request the site's policy refuses is recorded in its ledger, then answered with an
    error that names the limit (Flower turns the exception into the error reply)."""
    def wrap(handler):
        @functools.wraps(handler)
        def guarded(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except PolicyRefusal as refusal:
                asked = {**request_summary(msg.content.config_records.get(PHASE_A_RECORD)),
                         **request_summary(msg.content.config_records.get("config")),
                         "message_type": msg.metadata.message_type}
                record_refusal(context, phase, asked, refusal)
                raise
        return guarded
    return wrap


def _weights(msg: Message, cfg: PhaseAConfig) -> dict[str, torch.Tensor]:
    return unpack_model(msg.content["arrays"], cfg)


@app.train(mods=[hospital_dp_clipping])
@policy_guard("phase_a")
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = PhaseAConfig.from_record(config)
    site = site_for(context, cfg)
    if not site.policy.phase_a_train:  # the site's own choice: it receives the consortium model, sends nothing
        if asks_hospital_dp(config):  # its noise is scaled to every site's update
            raise PolicyRefusal("phase_a_train", "the run asks for hospital-level DP, which needs an update from "
                                "every site; this site receives phase A without training it")
        return Message(content=RecordDict({"metrics": MetricRecord({RECEIVE_ONLY: 1.0})}), reply_to=msg)
    held = context.state.config_records.get(PLAN_RECORD)
    state = json.loads(str(held["json"])) if held is not None else {}
    weights, metrics = site.train_round(_weights(msg, cfg), int(config["server-round"]), cfg.run_name, state)
    context.state[PLAN_RECORD] = ConfigRecord({"json": json.dumps(state)})
    content = RecordDict({"arrays": pack_model(weights, cfg), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@policy_guard("phase_a")
def evaluate(msg: Message, context: Context) -> Message:
    """Exact metrics are a query on the site's records: answered only if its policy says so (off by default)."""
    config = msg.content["config"]
    split = str(config.get("split", "val"))
    site_policy(context)[1].check_evaluate(split)
    cfg = PhaseAConfig.from_record(config)
    metrics = site_for(context, cfg).evaluate(_weights(msg, cfg), split=split)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("store_model")
@policy_guard("phase_a")
def store_model(msg: Message, context: Context) -> Message:
    """Keep the final global model at the site, next to the ledger entry that released it, then adapt it to the
    site's own records for its own prompts (client/adapt.py: site-only, never sent, no ledger entry). The reply is
    the same constant acknowledgement whatever the adaptation did; the node config's adapt-recommender=false skips it."""
    config = msg.content["config"]
    cfg = PhaseAConfig.from_record(config)
    site = site_for(context, cfg)
    site.store_global(_weights(msg, cfg), int(config["server-round"]), cfg.run_name)
    if str(context.node_config.get(ADAPT_KEY, "true")).lower() not in ("false", "0", "no"):
        from pmlm.client.adapt import adapt_after_phase_a

        adapt_after_phase_a(site.site_dir, site.examples, train_set=site.train_set)
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)


# -- phases B and C, and the ledger copy

def _site(msg: Message, context: Context):
    cfg = PhaseAConfig.from_record(msg.content[PHASE_A_RECORD])
    return site_for(context, cfg), cfg


def _phase_b_site(site, cfg: PhaseAConfig, config) -> SitePhaseB:
    from pmlm.client.phase_b import SitePhaseB

    run_id = site.policy.check_run_id(str(config["run_id"]))
    key = (str(site.site_dir), run_id)
    if key not in _B or _B[key][0] is not site:  # new, or its phase-A site was rebuilt under a changed policy
        plan = PhaseBConfig(**json.loads(str(config["plan"])))
        _B[key] = site, SitePhaseB(site.site_id, site.site_dir, site.examples, plan, run_id,
                                   budget=site.policy.budget(), phase_cap=site.caps.get("phase_b", 0.0))
    return _B[key][1]


def _phase_c_site(site, cfg: PhaseAConfig, config, context: Context) -> SitePhaseC:
    from pmlm.client.phase_c import SitePhaseC

    run_id = site.policy.check_run_id(str(config["run_id"]))
    key = (str(site.site_dir), run_id)
    if key not in _C or _C[key][0] is not site:
        plan = PhaseCConfig(**json.loads(str(config["plan"])))
        llm = json.loads(str(context.node_config.get("llm", "{}")))
        _C[key] = site, SitePhaseC(site.site_id, site.site_dir, site.examples, cfg.profile, plan, run_id, llm,
                                   budget=site.policy.budget(), phase_cap=site.caps.get("phase_c", 0.0))
    return _C[key][1]


def _vector_guard(phase: str, task):
    """A SecAgg+ vector task whose policy refusals are recorded like the handlers' (see policy_guard)."""
    def guarded(config: dict, context: Context, arrays: dict):
        try:
            return task(config, context, arrays)
        except (PolicyRefusal, GroupChanged) as refusal:
            record_refusal(context, phase, {**request_summary(config), "message_type": "secure_sum"}, refusal)
            raise
    return guarded


# Under secure aggregation the same releases travel as SecAgg+ vector tasks: the config carries phase A's
# fields (naming the run) as scalars, the arrays carry the centroids or the policy weights.
def _b_vector(config: dict, context: Context, arrays: dict):
    group = _group(context)  # a refusal comes before anything is computed
    cfg = PhaseAConfig.from_record(config)
    site = site_for(context, cfg)
    out = _phase_b_site(site, cfg, config).release(str(config["kind"]), arrays["centroids"], int(config["round"]),
                                                   arrays["centre"], **group)
    return out.values, {"noise_std": out.noise_std}


def _c_vector(config: dict, context: Context, arrays: dict):
    from pmlm.common.phase_c import policy_from_numpy

    group = _group(context)  # a refusal comes before anything is computed
    cfg = PhaseAConfig.from_record(config)
    site = _phase_c_site(site_for(context, cfg), cfg, config, context)
    policy = policy_from_numpy(arrays, int(config["embedding_dim"]))
    vector, _, metrics = site.round(policy, int(config["round"]), **group)
    return vector, metrics


def _group(context: Context) -> dict:
    """The secure-sum group this release goes to (seen by the site in SecAgg+'s key exchange), whether its
    policy (as it stands now) lets a kept release go to another group, and how much of the noise it may leave
    to the group (its policy refuses here, before anything is computed, a group that cannot carry it)."""
    keys = secure_sum_key_exchange()
    policy = site_policy(context)[1]
    return {"group": None if keys is None else keys.nodes, "other_group_allowed": policy.smaller_group_retry,
            "noise": policy.noise_sharing(keys)}


@app.query("ledger_entries")
@policy_guard("ledger")
def ledger_entries(msg: Message, context: Context) -> Message:
    """The site's signed ledger entries the coordinator has not copied yet (DP release metadata only)."""
    where, policy = site_checked(context, PhaseAConfig.from_record(msg.content[PHASE_A_RECORD]))
    held = json.loads(str(msg.content["config"]["held"]))  # site id -> last seq the coordinator holds
    after = int(held.get(where.site_id, -1))
    entries = [e for e in SiteLedger(where.site_dir, where.site_id, policy.budget()).entries() if e["seq"] > after]
    reply = ConfigRecord({"site_id": where.site_id, "entries": json.dumps(entries)})
    return Message(content=RecordDict({"config": reply}), reply_to=msg)


def _plain_sums_allowed(context: Context) -> None:
    try:
        site_policy(context)[1].check_plain_release("a plain (unmasked) sum")
    except PolicyRefusal as refusal:
        record_refusal(context, "secure_sum", {"message_type": "query.pmlm_plain_sum"}, refusal)
        raise


attach_secure_sum(app, check_plain=_plain_sums_allowed)
register_vector_task(PHASE_B_TASK, _vector_guard("phase_b", _b_vector))
register_vector_task(PHASE_C_TASK, _vector_guard("phase_c", _c_vector))


@app.query("phase_b_release")
@policy_guard("phase_b")
def phase_b_release(msg: Message, context: Context) -> Message:
    site_policy(context)[1].check_plain_release("a phase B release")
    site, cfg = _site(msg, context)
    config = msg.content["config"]
    arrays = msg.content["arrays"]
    out = _phase_b_site(site, cfg, config).release(str(config["kind"]), arrays["centroids"].numpy(),
                                                   int(config["round"]), arrays["centre"].numpy())
    reply = RecordDict({"arrays": ArrayRecord({"values": Array(np.ascontiguousarray(out.values))}),
                        "config": ConfigRecord({"ledger_entry": json.dumps(out.entry)})})
    return Message(content=reply, reply_to=msg)


@app.query("phase_b_store")
@policy_guard("phase_b")
def phase_b_store(msg: Message, context: Context) -> Message:
    from pmlm.client.phase_b import store_peer_profiles

    where, policy = site_checked(context, PhaseAConfig.from_record(msg.content[PHASE_A_RECORD]))
    run_id = policy.check_run_id(str(msg.content["config"]["run_id"]))
    ledger = SiteLedger(where.site_dir, where.site_id, policy.budget())
    store_peer_profiles(where.site_dir, ledger, run_id, profiles_from_message(msg.content))
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)


@app.query("phase_c_round")
@policy_guard("phase_c")
def phase_c_round(msg: Message, context: Context) -> Message:
    from pmlm.common.phase_c import policy_from

    site_policy(context)[1].check_plain_release("a phase C update")
    site, cfg = _site(msg, context)
    config = msg.content["config"]
    policy = policy_from(msg.content["arrays"], int(config["embedding_dim"]))
    vector, entry, metrics = _phase_c_site(site, cfg, config, context).round(policy, int(config["round"]))
    reply = RecordDict({"arrays": ArrayRecord({"update": Array(np.ascontiguousarray(vector))}),
                        "config": ConfigRecord({"ledger_entry": json.dumps(entry)}),
                        "metrics": MetricRecord(metrics)})
    return Message(content=reply, reply_to=msg)


@app.query("phase_c_store")
@policy_guard("phase_c")
def phase_c_store(msg: Message, context: Context) -> Message:
    from pmlm.client.phase_c import store_policy
    from pmlm.common.phase_c import policy_from

    where, site_rules = site_checked(context, PhaseAConfig.from_record(msg.content[PHASE_A_RECORD]))
    config = msg.content["config"]
    run_id = site_rules.check_run_id(str(config["run_id"]))
    policy = policy_from(msg.content["arrays"], int(config["embedding_dim"]))
    ledger = SiteLedger(where.site_dir, where.site_id, site_rules.budget())
    store_policy(where.site_dir, ledger, run_id, policy, json.loads(str(config["plan"])))
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)
