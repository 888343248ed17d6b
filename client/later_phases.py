"""The ClientApp's handlers for phases B and C (registered on the app defined in client_app.py).

Every message names the run through phase A's config record, so the node finds its site (data dir,
site dir, examples) exactly as phase A did. Replies carry one noisy array per site and the ledger
entry that paid for it, or site-level aggregates; nothing per patient.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pmlm.client.client_app import app, site_for
from pmlm.client.peers import PhaseBConfig
from pmlm.client.phase_a import PhaseAConfig
from pmlm.client.phase_b import SitePhaseB, store_peer_profiles
from pmlm.client.phase_c import PhaseCConfig, SitePhaseC, store_policy
from pmlm.client.secure_sum import attach_secure_sum, register_vector_task

PHASE_A_RECORD = "phase_a"
_B: dict[tuple[str, str], SitePhaseB] = {}
_C: dict[tuple[str, str], SitePhaseC] = {}


def _site(msg: Message, context: Context):
    cfg = PhaseAConfig.from_record(msg.content[PHASE_A_RECORD])
    return site_for(context, cfg), cfg


def _phase_b_site(site, cfg: PhaseAConfig, config) -> SitePhaseB:
    run_id = str(config["run_id"])
    key = (str(site.site_dir), run_id)
    if key not in _B:
        plan = PhaseBConfig(**json.loads(str(config["plan"])))
        _B[key] = SitePhaseB(site.site_id, site.site_dir, site.examples, plan, run_id, budget=cfg.budget())
    return _B[key]


def _phase_c_site(site, cfg: PhaseAConfig, config, context: Context) -> SitePhaseC:
    run_id = str(config["run_id"])
    key = (str(site.site_dir), run_id)
    if key not in _C:
        plan = PhaseCConfig(**json.loads(str(config["plan"])))
        llm = json.loads(str(context.node_config.get("llm", "{}")))
        _C[key] = SitePhaseC(site.site_id, site.site_dir, site.examples, cfg.profile, plan, run_id, llm,
                             budget=cfg.budget())
    return _C[key]


# Under secure aggregation the same releases travel as SecAgg+ vector tasks: the config carries phase A's
# fields (naming the run) as scalars, the arrays carry the centroids or the policy weights.
def _b_vector(config: dict, context: Context, arrays: dict):
    cfg = PhaseAConfig.from_record(config)
    out = _phase_b_site(site_for(context, cfg), cfg, config).release(str(config["kind"]), arrays["centroids"],
                                                                     int(config["round"]), arrays["centre"])
    mech = out.entry["mechanism"]
    return out.values, {"noise_std": float(mech["noise_multiplier"] * mech["l2_sensitivity"])}


def _c_vector(config: dict, context: Context, arrays: dict):
    from pmlm.server.phase_c import policy_from_numpy

    cfg = PhaseAConfig.from_record(config)
    site = _phase_c_site(site_for(context, cfg), cfg, config, context)
    policy = policy_from_numpy(arrays, int(config["embedding_dim"]))
    vector, _, metrics = site.round(policy, int(config["round"]))
    return vector, metrics


@app.query("ledger_entries")
def ledger_entries(msg: Message, context: Context) -> Message:
    """The site's signed ledger entries the coordinator has not copied yet (DP release metadata only)."""
    from pmlm.common.privacy import SiteLedger

    site, cfg = _site(msg, context)
    held = json.loads(str(msg.content["config"]["held"]))  # site id -> last seq the coordinator holds
    after = int(held.get(site.site_id, -1))
    entries = [e for e in SiteLedger(site.site_dir, site.site_id, cfg.budget()).entries() if e["seq"] > after]
    reply = ConfigRecord({"site_id": site.site_id, "entries": json.dumps(entries)})
    return Message(content=RecordDict({"config": reply}), reply_to=msg)


attach_secure_sum(app)
register_vector_task("phase_b_release", _b_vector)
register_vector_task("phase_c_round", _c_vector)


@app.query("phase_b_release")
def phase_b_release(msg: Message, context: Context) -> Message:
    site, cfg = _site(msg, context)
    config = msg.content["config"]
    arrays = msg.content["arrays"]
    out = _phase_b_site(site, cfg, config).release(str(config["kind"]), arrays["centroids"].numpy(),
                                                   int(config["round"]), arrays["centre"].numpy())
    reply = RecordDict({"arrays": ArrayRecord({"values": Array(np.ascontiguousarray(out.values))}),
                        "config": ConfigRecord({"ledger_entry": json.dumps(out.entry)})})
    return Message(content=reply, reply_to=msg)


@app.query("phase_b_store")
def phase_b_store(msg: Message, context: Context) -> Message:
    from pmlm.common.privacy import SiteLedger
    from pmlm.server.phase_b import profiles_from_message

    site, cfg = _site(msg, context)
    ledger = SiteLedger(site.site_dir, site.site_id, cfg.budget())
    store_peer_profiles(site.site_dir, ledger, str(msg.content["config"]["run_id"]), profiles_from_message(msg.content))
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)


@app.query("phase_c_round")
def phase_c_round(msg: Message, context: Context) -> Message:
    from pmlm.server.phase_c import policy_from

    site, cfg = _site(msg, context)
    config = msg.content["config"]
    policy = policy_from(msg.content["arrays"], int(config["embedding_dim"]))
    vector, entry, metrics = _phase_c_site(site, cfg, config, context).round(policy, int(config["round"]))
    reply = RecordDict({"arrays": ArrayRecord({"update": Array(np.ascontiguousarray(vector))}),
                        "config": ConfigRecord({"ledger_entry": json.dumps(entry)}),
                        "metrics": MetricRecord(metrics)})
    return Message(content=reply, reply_to=msg)


@app.query("phase_c_store")
def phase_c_store(msg: Message, context: Context) -> Message:
    from pmlm.server.phase_c import policy_from

    from pmlm.common.privacy import SiteLedger

    site, cfg = _site(msg, context)
    config = msg.content["config"]
    policy = policy_from(msg.content["arrays"], int(config["embedding_dim"]))
    ledger = SiteLedger(site.site_dir, site.site_id, cfg.budget())
    store_policy(site.site_dir, ledger, str(config["run_id"]), policy, json.loads(str(config["plan"])))
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)
