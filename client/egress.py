"""The site's egress log: every message this site sends is recorded here, at the site, before it leaves.

`record_egress` is an app-wide Flower mod of the site's ClientApp (client/client_app.py). App-wide mods
wrap every handler and sit outside the per-handler ones, so it sees each reply last: after Flower's
fixed-clipping mod and after SecAgg+ has masked a vector, i.e. the message exactly as it is handed to
the SuperNode. One JSON line per message goes to SITE_DIR/egress.jsonl (appended under an exclusive
lock and fsynced, so the fresh ClientApp process that handles each message in a deployment can share
the file with the others)::

    time            UTC, when the reply was recorded
    site_id         the hospital
    message_type    the handler: train, evaluate, query.<name>, train.pmlm_secure_sum (SecAgg+ stages)
    stage           the SecAgg+ stage, when there is one
    flower_run_id   Flower's run id;  run: PMLM's run name, when the request named one
    round           the round the request named, when it did
    message_id      sha256 of the deflated Message (Flower's own message id: metadata, error, content id)
    content_sha256  sha256 of the deflated content (Flower's object id of the RecordDict, which hashes
                    every record and array inside it)
    size_bytes      all the message's objects as Flower serialises them for sending
    records         record name -> type and keys (array names with shape and dtype)
    summary         record name -> key -> value: small scalars and config values verbatim, long text cut,
                    bytes as their length, arrays as shape/dtype/L2 norm (never their values)
    error           {code, reason} when the reply is an error (the reason text leaves the site too)

If the site directory cannot be found or the line cannot be written, the handler does not run and
nothing but Flower's error reply leaves: a message the auditor cannot see is not sent.

`pmlm audit egress SITE_DIR` reads the log. For tests and audits of the raw bytes, setting
PMLM_EGRESS_SPOOL=DIR also writes every message's serialised objects to DIR/SITE/MESSAGE_ID.bin (off by
default: the log keeps hashes, not payloads).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from pmlm.client.sites import site_location
from pmlm.common.atomic import append_durably, write_atomic
from pmlm.common.run_config import run_config_of
from pmlm.common.site_layout import EGRESS_LOG

SPOOL_ENV = "PMLM_EGRESS_SPOOL"
MAX_TEXT = 2000  # characters of a config string kept verbatim in the summary
MAX_LIST = 16  # items of a scalar list kept verbatim
ROUND_KEYS = ("server-round", "round")
RUN_KEYS = ("run_name", "run_id")


class EgressLogError(RuntimeError):
    """The site could not record a message it was about to send, so it does not send it."""


# Every field a reply may carry: message type -> record -> its keys ("*": any name, e.g. the model's weight
# names), and why it may leave. The README's threat model lists the same table; `pmlm audit egress` flags any
# field of the log outside it. Exact figures of the site's patients are on no line (no counts, no losses, no
# rewards); `evaluate` appears only at a site whose policy answers evaluations.
PUBLIC_FIELDS: dict[str, dict[str, tuple[set[str] | str, str]]] = {
    "train": {
        "arrays": ("*", "phase A's DP-SGD weights: clipped per patient, noised, charged in the ledger"),
        "metrics": ({"num-examples", "local-steps", "epsilon", "noise-multiplier"},
                    "FedAvg weight 1 (not a count), the public step count, the ledger's epsilon and noise"),
    },
    "evaluate": {"metrics": ({"num-examples", "recall@5", "ndcg@5", "micro_auroc", "risk_auroc"},
                             "exact validation metrics: only where the site's policy answers evaluations")},
    "query.store_model": {"metrics": ({"stored"}, "a constant acknowledgement")},
    "query.phase_b_store": {"metrics": ({"stored"}, "a constant acknowledgement")},
    "query.phase_c_store": {"metrics": ({"stored"}, "a constant acknowledgement")},
    "query.ledger_entries": {"config": ({"site_id", "entries"},
                                        "the signed ledger: each release's mechanism and epsilon, no counts")},
    "query.phase_b_release": {"arrays": ({"values"}, "phase B's noisy per-prototype sums and counts, charged"),
                              "config": ({"ledger_entry"}, "the signed entry that charged them")},
    "query.phase_c_round": {"arrays": ({"update"}, "phase C's noisy clipped policy-gradient sum, charged"),
                            "config": ({"ledger_entry"}, "the signed entry that charged it"),
                            "metrics": ({"noise-std"}, "the noise's standard deviation, as charged")},
    "query.pmlm_plain_sum": {"vector": ("*", "a noisy, charged vector (phase B or C), unmasked"),
                             "metrics": ({"noise_std", "noise-std"}, "the noise's standard deviation, as charged")},
    "train.pmlm_secure_sum": {
        "secaggplus_configs": ({"pk1", "pk2", "ctxts", "dsts", "masked_params", "nids", "shares"},
                               "SecAgg+ protocol: public keys, encrypted key shares, the masked noisy vector"),
        "fitres.parameters": (set(), "emptied by SecAgg+ before the reply leaves (the vector travels masked)"),
        "fitres.num_examples": ({"num_examples"}, "SecAgg+'s weight, a constant (every site weighs 1)"),
        "fitres.status": ({"code", "message"}, "a constant OK status"),
        "fitres.metrics": ({"noise_std", "noise-std"}, "the standard deviation of the noise the site added "
                                                       "(as charged, or σ/√k when it shares the noise)"),
    },
}


def fields_outside_public_list(entries: list[dict[str, Any]]) -> list[str]:
    """Each field of the logged replies that PUBLIC_FIELDS does not list, as 'line N: type / record / key'."""
    findings = []
    for number, entry in enumerate(entries, start=1):
        kind = str(entry.get("message_type"))
        allowed = PUBLIC_FIELDS.get(kind)
        for name, record in (entry.get("records") or {}).items():
            keys = record.get("keys", list(record.get("arrays", {})))
            rule = allowed.get(name) if allowed is not None else None
            if rule is None:
                findings.append(f"line {number}: {kind} / {name} (no such record on the public list)")
                continue
            listed = rule[0]
            findings += [f"line {number}: {kind} / {name} / {key}" for key in keys
                         if listed != "*" and key not in listed]
    return findings


def egress_log_path(site_dir: Path) -> Path:
    return Path(site_dir) / EGRESS_LOG


def record_egress(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: run the handler, then record what it sends (or the error text Flower will send)."""
    try:
        where = site_location(context.node_config, run_config_of(context.run_config))
    except (ValueError, KeyError, OSError) as exc:
        raise EgressLogError(f"no site directory to record egress in, so nothing is sent: {exc}") from exc
    facts = request_facts(msg)  # before the handler: Flower's SecAgg+ mod pops the stage from the request
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        # The runtime answers a raising handler with an error message in this format (flwr's
        # run_clientapp); the text of the exception leaves the site, so it is recorded as well.
        reason = str(type(exc)) + ":<'" + str(exc) + "'>"
        error = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        append_egress(where.site_dir, egress_entry(where.site_id, error, facts))
        raise
    append_egress(where.site_dir, egress_entry(where.site_id, reply, facts))
    return reply


def egress_entry(site_id: str, reply: Message, facts: dict[str, Any]) -> dict[str, Any]:
    """The log line for `reply`, with the request's `facts`; spools the raw bytes when asked to."""
    objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(reply).items()}
    message_id = reply.object_id
    entry: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "site_id": site_id, "message_type": reply.metadata.message_type, **facts,
        "flower_run_id": reply.metadata.run_id, "message_id": message_id,
        "content_sha256": reply.content.object_id if reply.has_content() else None,
        "size_bytes": sum(len(blob) for blob in objects.values()),
    }
    if reply.has_error():
        entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
    else:
        entry["records"], entry["summary"] = _describe_records(reply)
    spool = os.environ.get(SPOOL_ENV)
    if spool:
        write_atomic(Path(spool) / site_id / f"{message_id}.bin", b"".join(objects.values()))
    return entry


def append_egress(site_dir: Path, entry: dict[str, Any]) -> None:
    """Append one line; an exclusive lock keeps lines whole when several node processes write at once."""
    line = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    path = egress_log_path(site_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            append_durably(path, line)  # a full disk leaves no torn line: the partial one is cut off again
    except OSError as exc:
        raise EgressLogError(f"cannot append to the egress log {path}, so nothing is sent: {exc}") from exc


def read_egress_log(site_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The log's entries, and a problem line for each line that is not a JSON object (kept, not skipped)."""
    path = egress_log_path(site_dir)
    entries, problems = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                entry = json.loads(raw)
            except ValueError as exc:
                problems.append(f"{path}:{number}: not JSON ({exc}): {raw[:80]!r}")
                continue
            if not isinstance(entry, dict) or "message_type" not in entry:
                problems.append(f"{path}:{number}: not an egress entry: {raw[:80]!r}")
                continue
            entries.append(entry)
    return entries, problems


def egress_totals(entries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per message type: how many messages and bytes left, and how many were errors."""
    totals: dict[str, dict[str, int]] = {}
    for entry in entries:
        row = totals.setdefault(str(entry["message_type"]), {"messages": 0, "bytes": 0, "errors": 0})
        row["messages"] += 1
        row["bytes"] += int(entry.get("size_bytes") or 0)
        row["errors"] += "error" in entry
    return totals


def request_facts(request: Message) -> dict[str, Any]:
    """Round, PMLM run and SecAgg+ stage, as the request's config records named them."""
    facts: dict[str, Any] = {}
    for record in request.content.config_records.values() if request.has_content() else []:
        for key in ROUND_KEYS:
            value = record.get(key)
            if isinstance(value, (int, str)) and not isinstance(value, bool) and "round" not in facts:
                facts["round"] = value
        for key in RUN_KEYS:
            if key in record and "run" not in facts:
                facts["run"] = str(record[key])
        if "stage" in record and isinstance(record["stage"], str):
            facts["stage"] = record["stage"]
    return facts


# -- internals -----------------------------------------------------------------------------------


def _describe_records(reply: Message) -> tuple[dict[str, Any], dict[str, Any]]:
    records, summary = {}, {}
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            arrays = {key: _describe_array(array) for key, array in record.items()}
            records[name] = {"type": "ArrayRecord",
                             "arrays": {k: {"shape": a["shape"], "dtype": a["dtype"]} for k, a in arrays.items()}}
            summary[name] = arrays
        else:
            kind = "MetricRecord" if isinstance(record, MetricRecord) else "ConfigRecord"
            records[name] = {"type": kind, "keys": sorted(record)}
            summary[name] = {key: _summarise(value) for key, value in record.items()}
    return records, summary


def _describe_array(array) -> dict[str, Any]:
    described: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    try:
        values = np.asarray(array.numpy(), dtype=np.float64)
        described["l2_norm"] = _finite(float(np.linalg.norm(values.ravel())))
    except (TypeError, ValueError):  # an array Flower cannot show as numbers: shape and dtype only
        described["l2_norm"] = None
    return described


def _summarise(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else {"text": value[:MAX_TEXT], "chars": len(value)}
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, list):
        if any(isinstance(item, bytes) for item in value):
            return {"items": len(value), "bytes": sum(len(item) for item in value)}
        if len(value) <= MAX_LIST:
            return [_summarise(item) for item in value]
        numbers = [float(item) for item in value if isinstance(item, (int, float))]
        return {"items": len(value), "l2_norm": _finite(math.sqrt(sum(x * x for x in numbers)))}
    return value  # int, bool


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no NaN or infinity
