"""The site's egress log: what the mod records for each reply, and `pmlm audit egress` reading it back."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pmlm.cli import main
from pmlm.client.egress import (
    SPOOL_ENV,
    EgressLogError,
    append_egress,
    egress_log_path,
    read_egress_log,
    record_egress,
)

WEIGHTS = np.arange(12, dtype=np.float32).reshape(3, 4) / 7.0
calls: list[str] = []

app = ClientApp(mods=[record_egress])


@app.train()
def train(msg: Message, context: Context) -> Message:
    calls.append("train")
    content = RecordDict({"arrays": ArrayRecord({"w": Array(WEIGHTS)}),
                          "metrics": MetricRecord({"num-examples": 30, "loss": 1.25}),
                          "config": ConfigRecord({"note": "x" * 5000, "shares": [b"ab", b"cde"], "flag": True})})
    return Message(content=content, reply_to=msg)


@app.query("boom")
def boom(msg: Message, context: Context) -> Message:
    raise ValueError("the vector does not fit")


def _request(message_type: str, config: dict) -> Message:
    meta = Metadata(run_id=7, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content=RecordDict({"config": ConfigRecord(config)}), metadata=meta)


def _context(tmp_path, **node) -> Context:
    node = node or {"data-dir": str(tmp_path / "data"), "site-id": "hosp", "site-dir": str(tmp_path / "site")}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})


def test_a_reply_is_logged_with_hashes_keys_and_a_summary_never_the_values(tmp_path, monkeypatch):
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "spool"))
    reply = app(_request("train", {"server-round": 3, "run_name": "phase-a-xyz"}), _context(tmp_path))
    (entry,), problems = read_egress_log(tmp_path / "site")
    assert problems == []
    assert entry["site_id"] == "hosp" and entry["message_type"] == "train" and entry["flower_run_id"] == 7
    assert entry["round"] == 3 and entry["run"] == "phase-a-xyz"
    assert entry["message_id"] == reply.object_id
    assert entry["content_sha256"] == hashlib.sha256(reply.content.deflate()).hexdigest()
    assert entry["records"]["arrays"] == {"type": "ArrayRecord", "arrays": {"w": {"shape": [3, 4], "dtype": "float32"}}}
    assert entry["records"]["config"] == {"type": "ConfigRecord", "keys": ["flag", "note", "shares"]}
    summary = entry["summary"]
    assert summary["arrays"]["w"]["l2_norm"] == pytest.approx(float(np.linalg.norm(WEIGHTS)), rel=1e-6)
    assert summary["metrics"] == {"num-examples": 30, "loss": 1.25}
    assert summary["config"]["note"] == {"text": "x" * 2000, "chars": 5000}
    assert summary["config"]["shares"] == {"items": 2, "bytes": 5} and summary["config"]["flag"] is True
    assert str(float(WEIGHTS[2, 3])) not in json.dumps(entry)  # arrays are summarised, not dumped
    # The spool holds the serialised objects: their sizes add up to the logged size and hold the weights' bytes.
    spooled = (tmp_path / "spool" / "hosp" / f"{reply.object_id}.bin").read_bytes()
    assert len(spooled) == entry["size_bytes"] > WEIGHTS.nbytes
    assert WEIGHTS.tobytes() in spooled and reply.deflate() in spooled


def test_an_exception_is_logged_with_the_text_that_leaves_and_still_raised(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        app(_request("query.boom", {"round": 2}), _context(tmp_path))
    (entry,), _ = read_egress_log(tmp_path / "site")
    assert entry["message_type"] == "query.boom" and entry["round"] == 2
    assert "the vector does not fit" in entry["error"]["reason"] and entry["content_sha256"] is None


def test_a_node_that_is_no_known_site_sends_nothing(tmp_path):
    calls.clear()
    with pytest.raises(EgressLogError, match="no site directory"):
        app(_request("train", {}), _context(tmp_path, **{"partition-id": 0}))
    assert calls == []  # the handler never ran


def test_an_unwritable_log_stops_the_message(tmp_path):
    (tmp_path / "site").write_text("a file where the site directory should be")
    with pytest.raises(EgressLogError, match="cannot append"):
        app(_request("train", {}), _context(tmp_path))


def _append_many(site_dir, writer):
    for i in range(40):
        append_egress(site_dir, {"message_type": "train", "writer": writer, "i": i, "pad": "y" * 3000})


def test_lines_stay_whole_when_several_processes_append(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(tmp_path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    entries, problems = read_egress_log(tmp_path)
    assert problems == [] and len(entries) == 160
    assert sorted((e["writer"], e["i"]) for e in entries) == [(w, i) for w in range(4) for i in range(40)]


def test_audit_egress_table_json_and_errors(tmp_path, capsys):
    app(_request("train", {"server-round": 1}), _context(tmp_path))
    with pytest.raises(ValueError):
        app(_request("query.boom", {}), _context(tmp_path))
    site = tmp_path / "site"
    # This toy app sends a loss and a config record, which no PMLM reply may carry: the audit says so and fails.
    assert main(["audit", "egress", str(site)]) == 1
    table = capsys.readouterr().out
    assert "train" in table and "query.boom" in table and "does not fit" in table
    assert "w=(3, 4) float32 |x|=" in table and "2 messages" in table
    assert "line 1: train / metrics / loss" in table and "line 1: train / config (no such record" in table
    assert main(["audit", "egress", str(site), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert "line 1: train / metrics / num-examples" not in report["outside_public_list"]
    assert [m["message_type"] for m in report["messages"]] == ["train", "query.boom"]
    assert report["totals"]["query.boom"] == {"messages": 1, "bytes": report["messages"][1]["size_bytes"], "errors": 1}
    # A torn or foreign line is reported, not dropped silently; the rest is still shown.
    with open(egress_log_path(site), "ab") as f:
        f.write(b'{"message_type": "tr')
    assert main(["audit", "egress", str(site)]) == 1
    captured = capsys.readouterr()
    assert "2 messages" in captured.out and "not JSON" in captured.err
    assert main(["audit", "egress", str(tmp_path / "nowhere")]) == 2
    assert "no egress log" in capsys.readouterr().err


def test_a_field_off_the_public_list_is_flagged():
    from pmlm.client.egress import fields_outside_public_list

    honest = {"message_type": "train", "records": {"arrays": {"type": "ArrayRecord", "arrays": {"w": {}}},
                                                   "metrics": {"type": "MetricRecord", "keys": ["epsilon"]}}}
    leaky = {"message_type": "train", "records": {"metrics": {"type": "MetricRecord",
                                                              "keys": ["epsilon", "train-loss"]}}}
    unknown = {"message_type": "query.phase_c_round", "records": {"debug": {"type": "ConfigRecord", "keys": ["x"]}}}
    assert fields_outside_public_list([honest]) == []
    assert fields_outside_public_list([honest, leaky, unknown]) == [
        "line 2: train / metrics / train-loss", "line 3: query.phase_c_round / debug (no such record on the public list)"]
