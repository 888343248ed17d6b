"""The ClientApp's handlers for phases B and C (registered on the app defined in client_app.py).

Every message names the run through phase A's config record, so the node finds its site (data dir,
site dir, examples) exactly as phase A did, and the site's policy checks it as it checks phase A.
Replies carry one noisy array per site and the ledger entry that paid for it, or public figures;
nothing per patient. Plain (unmasked) releases are answered only where the site's policy allows them.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pmlm.client.client_app import app, policy_guard, record_refusal, request_summary, site_for, site_policy
from pmlm.client.peers import PhaseBConfig
from pmlm.client.phase_a import PhaseAConfig
from pmlm.client.phase_b import SitePhaseB, store_peer_profiles
from pmlm.client.phase_c import PhaseCConfig, SitePhaseC, store_policy
from pmlm.client.secure_sum import attach_secure_sum, register_vector_task, secure_sum_group
from pmlm.client.site_policy import PolicyRefusal
from pmlm.common.privacy import SiteLedger
from pmlm.common.privacy.kept import GroupChanged

PHASE_A_RECORD = "phase_a"
_B: dict[tuple[str, str], SitePhaseB] = {}
_C: dict[tuple[str, str], SitePhaseC] = {}


def _site(msg: Message, context: Context):
    cfg = PhaseAConfig.from_record(msg.content[PHASE_A_RECORD])
    return site_for(context, cfg), cfg


def _phase_b_site(site, cfg: PhaseAConfig, config) -> SitePhaseB:
    run_id = site.policy.check_run_id(str(config["run_id"]))
    key = (str(site.site_dir), run_id)
    if key not in _B:
        plan = PhaseBConfig(**json.loads(str(config["plan"])))
        _B[key] = SitePhaseB(site.site_id, site.site_dir, site.examples, plan, run_id, budget=site.policy.budget(),
                             phase_cap=site.caps.get("phase_b", 0.0))
    return _B[key]


def _phase_c_site(site, cfg: PhaseAConfig, config, context: Context) -> SitePhaseC:
    run_id = site.policy.check_run_id(str(config["run_id"]))
    key = (str(site.site_dir), run_id)
    if key not in _C:
        plan = PhaseCConfig(**json.loads(str(config["plan"])))
        llm = json.loads(str(context.node_config.get("llm", "{}")))
        _C[key] = SitePhaseC(site.site_id, site.site_dir, site.examples, cfg.profile, plan, run_id, llm,
                             budget=site.policy.budget(), phase_cap=site.caps.get("phase_c", 0.0))
    return _C[key]


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
    cfg = PhaseAConfig.from_record(config)
    site = site_for(context, cfg)
    out = _phase_b_site(site, cfg, config).release(str(config["kind"]), arrays["centroids"], int(config["round"]),
                                                   arrays["centre"], **_group(context))
    mech = out.entry["mechanism"]
    return out.values, {"noise_std": float(mech["noise_multiplier"] * mech["l2_sensitivity"])}


def _c_vector(config: dict, context: Context, arrays: dict):
    from pmlm.server.phase_c import policy_from_numpy

    cfg = PhaseAConfig.from_record(config)
    site = _phase_c_site(site_for(context, cfg), cfg, config, context)
    policy = policy_from_numpy(arrays, int(config["embedding_dim"]))
    vector, _, metrics = site.round(policy, int(config["round"]), **_group(context))
    return vector, metrics


def _group(context: Context) -> dict:
    """The secure-sum group this release goes to (seen by the site in SecAgg+'s key exchange), and whether its
    policy (as it stands now) lets a kept release go to another group."""
    return {"group": secure_sum_group(), "other_group_allowed": site_policy(context)[1].smaller_group_retry}


@app.query("ledger_entries")
@policy_guard("ledger")
def ledger_entries(msg: Message, context: Context) -> Message:
    """The site's signed ledger entries the coordinator has not copied yet (DP release metadata only)."""
    site, cfg = _site(msg, context)
    held = json.loads(str(msg.content["config"]["held"]))  # site id -> last seq the coordinator holds
    after = int(held.get(site.site_id, -1))
    entries = [e for e in SiteLedger(site.site_dir, site.site_id, site.policy.budget()).entries() if e["seq"] > after]
    reply = ConfigRecord({"site_id": site.site_id, "entries": json.dumps(entries)})
    return Message(content=RecordDict({"config": reply}), reply_to=msg)


def _plain_sums_allowed(context: Context) -> None:
    try:
        site_policy(context)[1].check_plain_release("a plain (unmasked) sum")
    except PolicyRefusal as refusal:
        record_refusal(context, "secure_sum", {"message_type": "query.pmlm_plain_sum"}, refusal)
        raise


attach_secure_sum(app, check_plain=_plain_sums_allowed)
register_vector_task("phase_b_release", _vector_guard("phase_b", _b_vector))
register_vector_task("phase_c_round", _vector_guard("phase_c", _c_vector))


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
    from pmlm.server.phase_b import profiles_from_message

    site, cfg = _site(msg, context)
    run_id = site.policy.check_run_id(str(msg.content["config"]["run_id"]))
    ledger = SiteLedger(site.site_dir, site.site_id, site.policy.budget())
    store_peer_profiles(site.site_dir, ledger, run_id, profiles_from_message(msg.content))
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)


@app.query("phase_c_round")
@policy_guard("phase_c")
def phase_c_round(msg: Message, context: Context) -> Message:
    from pmlm.server.phase_c import policy_from

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
    from pmlm.server.phase_c import policy_from

    site, cfg = _site(msg, context)
    config = msg.content["config"]
    run_id = site.policy.check_run_id(str(config["run_id"]))
    policy = policy_from(msg.content["arrays"], int(config["embedding_dim"]))
    ledger = SiteLedger(site.site_dir, site.site_id, site.policy.budget())
    store_policy(site.site_dir, ledger, run_id, policy, json.loads(str(config["plan"])))
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)
