"""The hospital's Flower ClientApp for phase A: messages in, calls into phase_a.SitePhaseA, messages out.

Which site this node is: in a deployment, the SuperNode's node config names it
(`--node-config "data-dir=/data/ehr site-dir=/srv/pmlm/site"`); in simulation, the run config's
`data-root` (a consortium folder) and `workdir` plus the node's `partition-id` pick one hospital.

What leaves the site: the updated weights (ArrayRecord) and site-level aggregates (MetricRecord:
number of training patients, mean loss, steps, cumulative epsilon). Nothing per patient. Every reply
of every handler (phases A, B and C) is first recorded in the site's egress log (client/egress.py).
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from pmlm.client.phase_a import PhaseAConfig, SitePhaseA, run_config_of
from pmlm.client.egress import record_egress
from pmlm.client.sites import site_location

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


def site_for(context: Context, cfg: PhaseAConfig) -> SitePhaseA:
    where = site_location(context.node_config, run_config_of(context.run_config))
    key = (str(where.site_dir), cfg.run_name)
    if key not in _SITES:
        _SITES[key] = SitePhaseA(where.site_id, where.data_dir, where.site_dir, cfg)
    return _SITES[key]


def _weights(msg: Message) -> dict[str, torch.Tensor]:
    return msg.content["arrays"].to_torch_state_dict()


@app.train(mods=[hospital_dp_clipping])
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
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = PhaseAConfig.from_record(config)
    metrics = site_for(context, cfg).evaluate(_weights(msg), split=str(config.get("split", "val")))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("store_model")
def store_model(msg: Message, context: Context) -> Message:
    """Keep the final global model at the site, next to the ledger entry that released it."""
    config = msg.content["config"]
    cfg = PhaseAConfig.from_record(config)
    site_for(context, cfg).store_global(_weights(msg), int(config["server-round"]), cfg.run_name)
    return Message(content=RecordDict({"metrics": MetricRecord({"stored": 1.0})}), reply_to=msg)


# Phases B and C register their handlers on this app.
from pmlm.client import later_phases  # noqa: E402,F401
