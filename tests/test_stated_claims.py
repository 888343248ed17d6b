"""Claims the code and README make that no test reached before (issue #22).

- `pmlm audit membership` exits 1 when an attack beats the bound of the artifact's ledger releases: here a
  model trained without DP whose ledger claims a tiny-epsilon DP-SGD release (a ledger that lies).
- The on-site gRPC service answers RESOURCE_EXHAUSTED when a call gets no turn at the LLM before its deadline,
  and FAILED_PRECONDITION for a site without records or without a ledger.
- Ingestion quarantines, each under its own rule: dates outside the years 1800-2200 (FHIR and CSV), a corrupt
  gzip, a CSV row (or header) that is not UTF-8; the good records around them are kept.

Everything here is deterministic: the overfit model is trained from fixed seeds, the attack's resampling is
seeded, the LLM's turn is held until the test lets it go.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from pmlm.cli import main
from pmlm.client import phase_a as phase_a_module
from pmlm.client.grpc_service import SiteState, start_server
from pmlm.client.ingest import RecordReader
from pmlm.client.llm import LLMConfig
from pmlm.client.phase_a import SitePhaseA
from pmlm.common.phase_a import PhaseAConfig, new_model
from pmlm.client.site_policy import SitePolicy
from pmlm.client.train import model_state
from pmlm.deploy.certs import make_deploy_keys
from pmlm.common.privacy import DpSgd, SiteLedger
from pmlm.common.profiles import load_profile
from pmlm.v1 import audit_service_pb2 as audit_pb
from pmlm.v1 import audit_service_pb2_grpc as audit_grpc
from pmlm.v1 import prompt_service_pb2 as prompt_pb
from pmlm.v1 import prompt_service_pb2_grpc as prompt_grpc

from conftest import EVENT_COLUMNS, SNOMED, pregnant_woman_rows, write_events_csv
from fake_llm import FakeOpenAIServer, serving as serving_llm  # serving() here starts a gRPC site
from test_grpc_service import OTHER_SITE, SITE, client_channel, tls_files, write_ledger, write_records


# -- pmlm audit membership exits 1 -----------------------------------------------------------------------------

def memorisable_records(folder: Path, women: int = 60) -> Path:
    """Visits that each bring five procedures drawn at random: nothing about one woman predicts another's next
    events, so a model fits its training patients only by memorising them."""
    procedures = [c for c in load_profile().concepts
                  if c.kind == "procedure" and c.obgyn and c.id.startswith("snomed:")][:40]
    rng = random.Random(5)
    rows = []
    for w in range(women):
        pid = f"liar-{w:03d}"
        start = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=4 * w)
        rows += pregnant_woman_rows(pid, datetime(1991, 2, 1, tzinfo=timezone.utc), start)
        when = start + timedelta(days=40)
        for v in range(6):
            when += timedelta(days=rng.randint(7, 60) if v else 0)
            visit = ("424441002", "Prenatal initial visit") if v == 0 else ("424619006", "Prenatal visit")
            rows.append([pid, when.isoformat(), "encounter", SNOMED, *visit, "", "", "", "AMB"])
            for concept in rng.sample(procedures, 5):
                rows.append([pid, (when + timedelta(hours=1)).isoformat(), "procedure", SNOMED,
                             concept.id.split(":", 1)[1], concept.name, "", "", "", ""])
    write_events_csv(folder, rows)
    return folder


def test_audit_membership_exits_1_when_an_attack_beats_the_ledgers_bound(tmp_path, monkeypatch):
    records = memorisable_records(tmp_path / "records")
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    policy = {"allow_non_private": True}
    (site_dir / "site.json").write_text(json.dumps({"site_id": "liar", "data_dir": str(records), "profile": "obgyn",
                                                    "privacy": policy}))
    # Trained without DP for many epochs, from fixed seeds (the site's own seeds come from `secrets`).
    seeds = random.Random(1)
    monkeypatch.setattr(phase_a_module, "secrets", SimpleNamespace(randbits=seeds.getrandbits))
    cfg = PhaseAConfig(phase_a_epsilon=0, rounds=1, local_epochs=100, lr=0.3, dim=16, max_history=16, points_per_patient=8,
                       batch_size=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        site = SitePhaseA("liar", records, site_dir, cfg, policy=SitePolicy(**policy))
        weights, _ = site.train_round(model_state(new_model(cfg, site.profile)), 1, "run-liar", {})
    finally:
        torch.set_num_threads(threads)
    folder = site.store_global(weights, 1, "run-liar")
    # The lie: the ledger signs a DP-SGD release of epsilon ~0.001 for this round, the manifest calls it private.
    ledger = SiteLedger(site_dir, "liar", site.policy.budget())
    _, entry = ledger.release("phase_a", DpSgd(50.0, 0.01, 1, 0.3), lambda: None, round=1, run_id="run-liar")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "private": True}))

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(["audit", "membership", str(site_dir)])
    assert code == 1, printed.getvalue()
    result = json.loads((site_dir / "audit" / "membership.json").read_text())
    (model,) = result["artifacts"]
    assert [r["seq"] for r in model["ledger_releases"]] == [entry["seq"]]
    assert model["epsilon"] < 0.01 and model["bound"] < 0.01
    beaten = [a for a in model["attacks"] if not a["consistent"]]
    assert beaten and all(a["advantage_ci"][0] > model["bound"] for a in beaten)
    assert all(a["verdict"].startswith("EXCEEDS the DP bound") for a in beaten)
    assert "EXCEEDS the DP bound" in printed.getvalue()


# -- gRPC statuses ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(site: dict, llm_config: LLMConfig | None = None):
    state = SiteState(site["dir"], llm_config=llm_config)
    server, port = start_server(state, "127.0.0.1:0", tls_files(site), max_workers=4)
    channel = client_channel(site, port)
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None).wait()
        state.close()


@pytest.fixture(scope="module")
def grpc_site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grpc-claims")
    ids = write_records(root / "records")
    write_ledger(root / "site")
    (root / "site" / "site.json").write_text(json.dumps({"site_id": SITE, "data_dir": str(root / "records"),
                                                         "profile": "obgyn"}))
    return {"dir": root / "site", "ids": ids, "keys": make_deploy_keys(root / "keys", [SITE, OTHER_SITE]),
            "root": root}


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_advise_without_a_turn_at_the_llm_before_its_deadline_is_resource_exhausted(grpc_site):
    with serving_llm(FakeOpenAIServer(held=True, text="- Prenatal visit\n", model="held")) as llm:
        config = LLMConfig(base_url=llm.base_url, model="held", max_retries=0, timeout_s=60, max_concurrent=1)
        with serving(grpc_site, config) as channel:
            stub = prompt_grpc.PromptServiceStub(channel)
            holder = stub.Advise(prompt_pb.AdviseRequest(patient_id=grpc_site["ids"][0]), timeout=60)
            assert next(holder).WhichOneof("event") == "prompt"
            assert llm.arrived.wait(30), "the first call never reached the LLM"
            # The only turn is held: the second call must hear RESOURCE_EXHAUSTED, not run out its deadline.
            error = rpc_error(lambda: list(stub.Advise(prompt_pb.AdviseRequest(patient_id=grpc_site["ids"][1]),
                                                       timeout=5)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
            assert "no turn within" in error.details()
            llm.release.set()
            events = list(holder)
            assert events[-1].WhichOneof("event") == "done"  # the holder was served all along


def test_a_site_without_records_or_ledger_is_failed_precondition(grpc_site, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "site.json").write_text(json.dumps({"site_id": SITE, "data_dir": str(tmp_path / "gone"),
                                                "profile": "obgyn"}))
    with serving({**grpc_site, "dir": bare}) as channel:
        prompt, audit = prompt_grpc.PromptServiceStub(channel), audit_grpc.AuditServiceStub(channel)
        error = rpc_error(lambda: prompt.AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id="anyone"),
                                                        timeout=30))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "data_dir" in error.details()
        for call in (lambda: audit.ListReleases(audit_pb.ListReleasesRequest(), timeout=30),
                     lambda: audit.Verify(audit_pb.VerifyRequest(), timeout=30)):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "no privacy ledger" in error.details()
        status = prompt.GetSiteStatus(prompt_pb.GetSiteStatusRequest(), timeout=30)
        assert status.site_id == SITE and not status.ledger_present  # the service itself keeps serving


# -- ingestion's quarantine rules ----------------------------------------------------------------------------

def read_all(path: Path):
    reader = RecordReader(path)
    timelines = {t.patient_id: t for t in reader}
    return timelines, reader.quarantined


def fhir_bundle(pid: str, birth: str, *encounter_dates: str) -> dict:
    entries = [{"fullUrl": f"urn:uuid:{pid}", "resource": {"resourceType": "Patient", "id": pid, "birthDate": birth,
                                                           "gender": "female"}}]
    for i, when in enumerate(encounter_dates):
        entries.append({"resource": {
            "resourceType": "Encounter", "id": f"{pid}-e{i}", "class": {"code": "AMB"},
            "subject": {"reference": f"urn:uuid:{pid}"},
            "type": [{"coding": [{"system": SNOMED, "code": "424619006", "display": "Prenatal visit"}]}],
            "period": {"start": when}}})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def test_dates_outside_1800_to_2200_are_quarantined_and_the_edges_kept(tmp_path):
    folder = tmp_path / "fhir"
    folder.mkdir()
    (folder / "edges.json").write_text(json.dumps(fhir_bundle(
        "edges", "1990-01-01", "1800-01-01T00:00:00Z", "2200-12-31T23:00:00Z", "1799-12-31T23:59:59Z",
        "2201-01-01T00:00:00Z")))
    (folder / "sentinel.json").write_text(json.dumps(fhir_bundle("sentinel", "0001-01-01", "2024-03-01")))
    timelines, quarantined = read_all(folder)
    assert sorted(e.time.year for e in timelines["edges"].events) == [1800, 2200]
    outside = sorted(q.resource for q in quarantined if "implausible date" in q.reason and "1800-2200" in q.reason)
    assert outside == ["Encounter/edges-e2", "Encounter/edges-e3", "Patient/sentinel"], quarantined
    assert "sentinel" in timelines and len(timelines["sentinel"].events) == 1  # her other records are kept

    rows = [*pregnant_woman_rows("csv-1", datetime(1990, 1, 1, tzinfo=timezone.utc),
                                 datetime(2024, 1, 1, tzinfo=timezone.utc)),
            ["csv-1", "1799-06-01T00:00:00+00:00", "procedure", SNOMED, "225158009", "Auscultation", "", "", "", ""],
            ["csv-1", "2200-06-01T00:00:00+00:00", "procedure", SNOMED, "225158009", "Auscultation", "", "", "", ""],
            ["csv-1", "9999-01-01T00:00:00+00:00", "procedure", SNOMED, "225158009", "Auscultation", "", "", "", ""]]
    write_events_csv(tmp_path / "csv", rows)
    timelines, quarantined = read_all(tmp_path / "csv")
    assert [q.resource for q in quarantined if "implausible date" in q.reason] == ["line 4", "line 6"]
    assert sorted(e.time.year for e in timelines["csv-1"].events) == [2024, 2200]


def test_a_corrupt_gzip_is_quarantined_as_unreadable_and_the_next_file_read(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    good = io.StringIO()
    out = csv.writer(good)
    out.writerow(EVENT_COLUMNS)
    out.writerows(pregnant_woman_rows("in-corrupt-1", datetime(1990, 1, 1, tzinfo=timezone.utc),
                                      datetime(2024, 1, 1, tzinfo=timezone.utc)))
    packed = bytearray(gzip.compress(("".join([good.getvalue()] * 1) + "\n".join(
        f"lost-{i},2024-01-0{1 + i % 9}T00:00:00+00:00,procedure,{SNOMED},225158009,Auscultation,,,,"
        for i in range(400))).encode(), mtime=0))
    packed[len(packed) // 2] ^= 0xFF  # one flipped byte in the middle of the deflate stream
    (folder / "a_events.csv.gz").write_bytes(bytes(packed))
    truncated = gzip.compress(json.dumps(fhir_bundle("gone", "1990-01-01", "2024-01-02")).encode(), mtime=0)
    (folder / "b_bundle.json.gz").write_bytes(truncated[: len(truncated) // 2])
    (folder / "c_bundle.json").write_text(json.dumps(fhir_bundle("after", "1990-01-01", "2024-01-02")))
    timelines, quarantined = read_all(folder)
    unreadable = {Path(q.file).name: q.reason for q in quarantined if q.reason.startswith("unreadable file:")}
    assert set(unreadable) == {"a_events.csv.gz", "b_bundle.json.gz"}, quarantined
    assert not any(pid.startswith("lost-") or pid in ("in-corrupt-1", "gone") for pid in timelines)  # no half file
    assert "after" in timelines


def test_csv_rows_that_are_not_utf8_are_quarantined_one_by_one(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    rows = pregnant_woman_rows("utf-1", datetime(1990, 1, 1, tzinfo=timezone.utc),
                               datetime(2024, 1, 1, tzinfo=timezone.utc))
    text = io.StringIO()
    out = csv.writer(text)
    out.writerow(EVENT_COLUMNS)
    out.writerows(rows)
    lines = text.getvalue().encode().splitlines(keepends=True)
    bad = f"utf-1,2024-02-01T00:00:00+00:00,procedure,{SNOMED},225158009,Ausculta".encode() + b"\xff\xfe" + \
        b"tion,,,,\r\n"
    (folder / "events.csv").write_bytes(b"".join([*lines, bad, lines[-1].replace(b"2024-01-01", b"2024-03-01")]))
    (folder / "latin1_header.csv").write_bytes(",".join(EVENT_COLUMNS).replace("display", "d\xe9tail").encode("latin-1")
                                               + b"\r\nlat-1,2024-01-01,patient,,female,,,,,\r\n")
    timelines, quarantined = read_all(folder)
    reasons = {(Path(q.file).name, q.reason, q.resource) for q in quarantined}
    assert reasons == {("events.csv", "row is not UTF-8 text", "line 4"),
                       ("latin1_header.csv", "not UTF-8 text (in the header)", "")}, quarantined
    assert [e.time.month for e in timelines["utf-1"].events] == [1, 3]  # the rows around the bad one are kept
    assert "lat-1" not in timelines
