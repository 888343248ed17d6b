"""The hospital's Flower ClientApp for phase A: messages in, calls into phase_a.SitePhaseA, messages out.

Which site this node is: in a deployment, the SuperNode's node config names it
(`--node-config "data-dir=/data/ehr site-dir=/srv/pmlm/site"`); in simulation, the run config's
`data-root` (a consortium folder) and `workdir` plus the node's `partition-id` pick one hospital.

What leaves the site: the DP-trained weights (ArrayRecord) and public figures (MetricRecord: a FedAvg
weight of 1, the public step count, the cumulative epsilon and noise multiplier). Nothing per patient,
no exact count (the README's threat model lists every field). Every reply of every handler (phases A,
B and C) is first recorded in the site's egress log (client/egress.py).

The site's own policy (client/site_policy.py) decides what it answers: a request outside it raises
PolicyRefusal, which `policy_guard` records as a signed ledger line before the error reply leaves.
"""

from __future__ import annotations

import functools
import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from pmlm.client.phase_a import PhaseAConfig, SitePhaseA, run_config_of
from pmlm.client.egress import record_egress
from pmlm.client.site_policy import PolicyRefusal, SitePolicy
from pmlm.client.sites import SiteLocation, site_location
from pmlm.common.privacy.ledger import SiteLedger

PLAN_RECORD = "phase-a-plan"
_SITES: dict[tuple[str, str], SitePhaseA] = {}  # per node process: (site dir, run) -> loaded site

# Every handler runs inside the egress log's mod; app-wide mods are the outermost, so it sees the final reply.
app = ClientApp(mods=[record_egress])


def hospital_dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side fixed clipping, when the server asked for hospital-level DP."""
    config = msg.content.config_records.get("config")
    if config is not None and "clipping_norm" in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def site_policy(context: Context) -> tuple[SiteLocation, SitePolicy]:
    """Which hospital this node is, and its own privacy policy (node config and site.json, never the run)."""
    where = site_location(context.node_config, run_config_of(context.run_config))
    return where, SitePolicy.load(where.site_dir, context.node_config)


def site_for(context: Context, cfg: PhaseAConfig) -> SitePhaseA:
    """The site's phase-A state for this run; raises PolicyRefusal for a run outside the site's policy."""
    where, policy = site_policy(context)
    key = (str(where.site_dir), policy.check_run_id(cfg.run_name))
    if key not in _SITES:
        _SITES[key] = SitePhaseA(where.site_id, where.data_dir, where.site_dir, cfg, policy=policy)
    return _SITES[key]


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
                asked = {**request_summary(msg.content.config_records.get("phase_a")),
                         **request_summary(msg.content.config_records.get("config")),
                         "message_type": msg.metadata.message_type}
                record_refusal(context, phase, asked, refusal)
                raise
        return guarded
    return wrap


def _weights(msg: Message) -> dict[str, torch.Tensor]:
    return msg.content["arrays"].to_torch_state_dict()


@app.train(mods=[hospital_dp_clipping])
@policy_guard("phase_a")
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = PhaseAConfig.from_record(config)
    site = site_for(context, cfg)
    held = context.state.config_records.get(PLAN_RECORD)
    state = json.loads(str(held["json"])) if held is not None else {}
    weights, metrics = site.train_round(_weights(msg), int(config["server-round"]), cfg.run_name, state)
    context.state[PLAN_RECORD] = ConfigRecord({"json": json.dumps(state)})
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@policy_guard("phase_a")
def evaluate(msg: Message, context: Context) -> Message:
    """Exact metrics are a query on the site's records: answered only if its policy says so (off by default)."""
    config = msg.content["config"]
    split = str(config.get("split", "val"))
    site_policy(context)[1].check_evaluate(split)
    cfg = PhaseAConfig.from_record(config)
    metrics = site_for(context, cfg).evaluate(_weights(msg), split=split)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("store_model")
@policy_guard("phase_a")
def store_model(msg: Message, context: Context) -> Message:
    """Keep the final global model at the site, next to the ledger entry that released it."""
    config = msg.content["config"]
    cfg = PhaseAConfig.from_record(config)
    site_for(context, cfg).store_global(_weights(msg), int(config["server-round"]), cfg.run_name)
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)


# Phases B and C register their handlers on this app.
from pmlm.client import later_phases  # noqa: E402,F401
