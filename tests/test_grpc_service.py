"""pmlm.v1 PromptService and AuditService over a real TLS channel on loopback.

One in-process server (mutual TLS, certificates from `pmlm deploy certs`' code) on a small site:
six pregnant women in an event CSV, a privacy ledger with two releases and a refusal, and a fake
OpenAI-compatible LLM on 127.0.0.1 so Advise does not depend on a real model. One test runs
`pmlm serve` itself as a process.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from fake_llm import FakeOpenAIServer, serving

from pmlm.cli import main
from pmlm.client.access_log import read_access_log
from pmlm.client.grpc_service import InsecureServiceError, SiteState, TlsFiles, start_server
from pmlm.client.llm import LLMConfig
from pmlm.deploy.certs import make_deploy_keys
from pmlm.common.privacy import AccountantSettings, BudgetConfig, BudgetExhausted, DpSgd, GaussianRelease, SiteLedger
from pmlm.v1 import audit_service_pb2 as audit_pb
from pmlm.v1 import audit_service_pb2_grpc as audit_grpc
from pmlm.v1 import prompt_service_pb2 as prompt_pb
from pmlm.v1 import prompt_service_pb2_grpc as prompt_grpc

SITE = "hospital_a"
OTHER_SITE = "hospital_b"  # a second hospital of the same consortium CA
SNOMED, LOINC = "http://snomed.info/sct", "http://loinc.org"
ANSWER = "- Prenatal visit within 4 weeks\n- Auscultation of fetal heart\n- Fundal height measurement\n"
TIMEOUT_S = 30


def write_records(folder: Path, women: int = 6) -> list[str]:
    """Each woman: a pregnancy, then prenatal visits every 4 weeks with the usual procedures and BP."""
    folder.mkdir(parents=True)
    rows, ids = [], []
    for w in range(women):
        pid = f"{SITE}-patient-{w:03d}"
        ids.append(pid)
        start = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=17 * w)
        rows.append([pid, datetime(1992 + w, 3, 1, tzinfo=timezone.utc).isoformat(), "patient", "", "female",
                     "", "", "", "", ""])
        rows.append([pid, start.isoformat(), "condition", SNOMED, "72892002", "Normal pregnancy", "", "",
                     (start + timedelta(days=266)).isoformat(), ""])
        for v in range(6):
            t = (start + timedelta(days=42 + 28 * v)).isoformat()
            code = ("424441002", "Prenatal initial visit") if v == 0 else ("424619006", "Prenatal visit")
            rows.append([pid, t, "encounter", SNOMED, *code, "", "", "", "AMB"])
            rows.append([pid, t, "procedure", SNOMED, "225158009", "Auscultation of fetal heart", "", "", "", ""])
            rows.append([pid, t, "observation", LOINC, "8480-6", "Systolic Blood Pressure", str(112 + 3 * v),
                         "mm[Hg]", "", ""])
            rows.append([pid, t, "observation", LOINC, "8462-4", "Diastolic Blood Pressure", "74", "mm[Hg]", "", ""])
    with open(folder / "events.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "time", "kind", "system", "code", "display", "value", "unit", "end",
                         "encounter_class"])
        writer.writerows(rows)
    return ids


def write_ledger(site_dir: Path) -> None:
    budget = BudgetConfig(3.0, 1e-5, {"phase_a": 0.5, "phase_b": 0.3, "phase_c": 0.2})
    ledger = SiteLedger(site_dir, SITE, budget, settings=AccountantSettings(pld_value_discretization_interval=1e-2),
                        run_id="run-1")
    ledger.release("phase_a", DpSgd(2.5, 0.05, 8, 1.0), lambda: None, round=1, population_size=6)
    ledger.release("phase_b", GaussianRelease(6.0, 1.0), lambda: None, round=0, population_size=6)
    with pytest.raises(BudgetExhausted):
        ledger.release("phase_c", GaussianRelease(0.2, 1.0), lambda: None, round=0)


@pytest.fixture(scope="module")
def fake_llm():
    with serving(FakeOpenAIServer(text=ANSWER, prompt_tokens=321, completion_tokens=21, model="fake-llm")) as server:
        yield server


@pytest.fixture(scope="module")
def site(tmp_path_factory, fake_llm):
    root = tmp_path_factory.mktemp("grpc")
    site_dir = root / "site"
    ids = write_records(root / "records")
    write_ledger(site_dir)
    (site_dir / "site.json").write_text(json.dumps({
        "site_id": SITE, "data_dir": str(root / "records"), "profile": "obgyn",
        "llm": {"base_url": fake_llm.base_url, "model": "fake-llm", "max_retries": 0, "timeout_s": 10}}))
    keys = make_deploy_keys(root / "keys", [SITE, OTHER_SITE])
    return {"dir": site_dir, "ids": ids, "keys": keys, "root": root}


def tls_files(site) -> TlsFiles:
    keys = site["keys"]
    return TlsFiles(keys[f"{SITE}/service-cert"], keys[f"{SITE}/service-key"], keys["ca"])


def client_channel(site, port: int, *, with_client_cert: bool = True, as_site: str = SITE) -> grpc.Channel:
    keys = site["keys"]
    credentials = grpc.ssl_channel_credentials(
        keys["ca"].read_bytes(),
        private_key=keys[f"{as_site}/client-key"].read_bytes() if with_client_cert else None,
        certificate_chain=keys[f"{as_site}/client-cert"].read_bytes() if with_client_cert else None)
    return grpc.secure_channel(f"localhost:{port}", credentials)


@pytest.fixture(scope="module")
def served(site):
    state = SiteState(site["dir"])
    server, port = start_server(state, "127.0.0.1:0", tls_files(site), max_workers=4)
    channel = client_channel(site, port)
    yield {"port": port, "channel": channel, "prompt": prompt_grpc.PromptServiceStub(channel),
           "audit": audit_grpc.AuditServiceStub(channel)}
    channel.close()
    server.stop(None).wait()
    state.close()


def assert_status(call, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    for word in words:
        assert word in caught.value.details()


def test_site_status_reports_budget_and_artifacts(served):
    status = served["prompt"].GetSiteStatus(prompt_pb.GetSiteStatusRequest(), timeout=TIMEOUT_S)
    assert status.site_id == SITE and status.ledger_present
    assert status.releases == 2 and status.epsilon_total == 3.0 and status.delta == 1e-5
    assert 0 < status.epsilon_spent <= 3.0
    assert status.epsilon_remaining == pytest.approx(3.0 - status.epsilon_spent)
    assert {p.phase: p.epsilon_cap for p in status.phases} == pytest.approx({"phase_a": 1.5, "phase_b": 0.9, "phase_c": 0.6})
    assert list(status.artifacts) == []  # no phase has stored a global artifact at this site


def test_assemble_prompt_is_deidentified_and_says_where_facts_came_from(served, site):
    patient = site["ids"][2]
    reply = served["prompt"].AssemblePrompt(
        prompt_pb.AssemblePromptRequest(patient_id=patient, question="What does she need next?"), timeout=TIMEOUT_S)
    assert [m.role for m in reply.messages] == ["system", "user"]
    text = "\n".join(m.content for m in reply.messages)
    assert patient not in text and "2024" not in text  # no record number, no absolute date
    assert "What does she need next?" in text
    assert reply.facts and all(f.source for f in reply.facts) and "the patient's record" in {f.source for f in reply.facts}
    assert all(f.text for f in reply.facts) and "prenatal" in reply.visit.lower()
    assert not reply.used_global_model and any("phase A" in note for note in reply.missing)
    assert reply.approx_tokens > 0


def test_prompt_params_are_applied_and_checked(served, site):
    stub, patient = served["prompt"], site["ids"][0]
    bare = stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(
        patient_id=patient, params=prompt_pb.PromptParams(summary=False, reasoning=False)), timeout=TIMEOUT_S)
    full = stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id=patient), timeout=TIMEOUT_S)
    assert bare.approx_tokens < full.approx_tokens
    assert_status(lambda: stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(
        patient_id=patient, params=prompt_pb.PromptParams(self_items=7)), timeout=TIMEOUT_S),
        grpc.StatusCode.INVALID_ARGUMENT, "self_items")


def test_bad_requests_get_clear_statuses(served):
    stub = served["prompt"]
    assert_status(lambda: stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id=""), timeout=TIMEOUT_S),
                  grpc.StatusCode.INVALID_ARGUMENT, "patient_id")
    assert_status(lambda: stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id="nobody"),
                                              timeout=TIMEOUT_S), grpc.StatusCode.NOT_FOUND, "nobody")
    assert_status(lambda: stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id="x", question="?" * 2001),
                                              timeout=TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT, "question")


def test_malformed_bytes_are_refused_and_the_server_keeps_serving(served, site):
    raw = served["channel"].unary_unary("/pmlm.v1.PromptService/AssemblePrompt",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    # field 1 (patient_id, a string) holding bytes that are not UTF-8: not a valid message
    assert_status(lambda: raw(b"\x0a\x02\xff\xfe", timeout=TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT,
                  "pmlm.v1.AssemblePromptRequest")
    assert_status(lambda: raw(b"\xff\xff\xff\xff", timeout=TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT)
    advise_raw = served["channel"].unary_stream("/pmlm.v1.PromptService/Advise",
                                                request_serializer=lambda b: b, response_deserializer=lambda b: b)
    assert_status(lambda: list(advise_raw(b"\x0a\x02\xff\xfe", timeout=TIMEOUT_S)), grpc.StatusCode.INVALID_ARGUMENT)
    reply = served["prompt"].AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id=site["ids"][1]),
                                            timeout=TIMEOUT_S)
    assert reply.messages


def test_advise_streams_prompt_then_answer_then_usage(served, site, fake_llm):
    events = list(served["prompt"].Advise(prompt_pb.AdviseRequest(patient_id=site["ids"][3]), timeout=TIMEOUT_S))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "prompt" and kinds[-1] == "done" and set(kinds[1:-1]) == {"text"} and len(kinds) >= 4
    assert "".join(e.text for e in events[1:-1]) == ANSWER
    done = events[-1].done
    assert (done.model, done.prompt_tokens, done.completion_tokens) == ("fake-llm", 321, 21)
    # Her care checklist comes first, with the prompt; the answer's check and the notice naming the model last.
    assert events[0].prompt.checklist.stage.startswith("pregnant, gestational week")
    assert done.check.allowed_items == 5 and [i.text for i in done.check.items] == ANSWER.splitlines()
    assert not any(i.removed for i in done.check.items)
    flags = {i.text: list(i.reasons) for i in done.check.items}
    assert flags["- Fundal height measurement"] == [
        "names fundal height measurement, which is neither in the prompt nor in the record"]
    assert done.notice == ("Generated by fake-llm (local endpoint 127.0.0.1) — decision support, not a diagnosis; "
                           "check against the record.")
    sent = fake_llm.requests[-1]["json"]["messages"]  # the LLM got exactly the prompt the stream showed first
    assert sent == [{"role": m.role, "content": m.content} for m in events[0].prompt.messages]


def test_advise_with_the_llm_down_ends_with_unavailable(site):
    with socket_closed_port() as port:
        state = SiteState(site["dir"], llm_config=LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="x",
                                                             max_retries=0, timeout_s=5))
        server, bound = start_server(state, "127.0.0.1:0", tls_files(site), max_workers=2)
        try:
            with client_channel(site, bound) as channel:
                stream = prompt_grpc.PromptServiceStub(channel).Advise(
                    prompt_pb.AdviseRequest(patient_id=site["ids"][0]), timeout=TIMEOUT_S)
                assert next(stream).WhichOneof("event") == "prompt"
                assert_status(lambda: next(stream), grpc.StatusCode.UNAVAILABLE, "LLM endpoint")
        finally:
            server.stop(None).wait()
            state.close()


def socket_closed_port():
    import contextlib
    import socket

    @contextlib.contextmanager
    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            yield s.getsockname()[1]  # bound but not listening: connections are refused
    return port()


def test_audit_lists_releases_and_verifies(served, site):
    audit = served["audit"]
    releases = audit.ListReleases(audit_pb.ListReleasesRequest(), timeout=TIMEOUT_S)
    assert releases.site_id == SITE and [e.phase for e in releases.entries] == ["phase_a", "phase_b"]
    assert [e.seq for e in releases.entries] == sorted(e.seq for e in releases.entries)
    first = releases.entries[0]
    assert json.loads(first.mechanism_json)["type"] == "dp-sgd" and json.loads(first.entry_json)["signature"]
    everything = audit.ListReleases(audit_pb.ListReleasesRequest(include_refusals=True), timeout=TIMEOUT_S)
    assert [e.kind for e in everything.entries] == ["release", "release", "refusal"]
    only_b = audit.ListReleases(audit_pb.ListReleasesRequest(phase="phase_b"), timeout=TIMEOUT_S)
    assert [e.phase for e in only_b.entries] == ["phase_b"]

    verified = audit.Verify(audit_pb.VerifyRequest(), timeout=TIMEOUT_S)
    assert verified.ok and verified.entries == 4 and not verified.problems and verified.epsilon > 0
    filed = (site["dir"] / "keys" / "site_ed25519.key.pub").read_bytes()
    assert audit.Verify(audit_pb.VerifyRequest(trusted_public_key=filed), timeout=TIMEOUT_S).ok
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    wrong = audit.Verify(audit_pb.VerifyRequest(trusted_public_key=stranger), timeout=TIMEOUT_S)
    assert not wrong.ok and wrong.problems
    assert_status(lambda: audit.Verify(audit_pb.VerifyRequest(trusted_public_key=b"not a key"), timeout=TIMEOUT_S),
                  grpc.StatusCode.INVALID_ARGUMENT, "trusted_public_key")


def test_tls_is_required_and_client_certificates_are_checked(served, site, tmp_path):
    port = served["port"]
    request = prompt_pb.GetSiteStatusRequest()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        assert_status(lambda: prompt_grpc.PromptServiceStub(plain).GetSiteStatus(request, timeout=5),
                      grpc.StatusCode.UNAVAILABLE)
    with client_channel(site, port, with_client_cert=False) as no_cert:
        assert_status(lambda: prompt_grpc.PromptServiceStub(no_cert).GetSiteStatus(request, timeout=5),
                      grpc.StatusCode.UNAVAILABLE)
    other = make_deploy_keys(tmp_path / "other-ca", [SITE])  # a certificate from a CA the site does not trust
    credentials = grpc.ssl_channel_credentials(site["keys"]["ca"].read_bytes(),
                                               private_key=other[f"{SITE}/client-key"].read_bytes(),
                                               certificate_chain=other[f"{SITE}/client-cert"].read_bytes())
    with grpc.secure_channel(f"localhost:{port}", credentials) as foreign:
        assert_status(lambda: prompt_grpc.PromptServiceStub(foreign).GetSiteStatus(request, timeout=5),
                      grpc.StatusCode.UNAVAILABLE)
    assert served["prompt"].GetSiteStatus(request, timeout=TIMEOUT_S).site_id == SITE


def new_log_lines(site, since: int) -> list[dict]:
    return read_access_log(site["dir"])[0][since:]


def logged_so_far(site) -> int:
    path = site["dir"] / "audit" / "access_log.jsonl"
    return len(read_access_log(site["dir"])[0]) if path.exists() else 0


def test_another_sites_certificate_is_denied_on_every_call_and_logged(served, site):
    """Hospital B's client certificate is signed by the same consortium CA, so TLS accepts it; the site does not."""
    before = logged_so_far(site)
    patient = site["ids"][0]
    with client_channel(site, served["port"], as_site=OTHER_SITE) as channel:
        prompt, audit = prompt_grpc.PromptServiceStub(channel), audit_grpc.AuditServiceStub(channel)
        calls = {
            "/pmlm.v1.PromptService/GetSiteStatus": lambda: prompt.GetSiteStatus(prompt_pb.GetSiteStatusRequest(),
                                                                                 timeout=TIMEOUT_S),
            "/pmlm.v1.PromptService/AssemblePrompt": lambda: prompt.AssemblePrompt(
                prompt_pb.AssemblePromptRequest(patient_id=patient), timeout=TIMEOUT_S),
            "/pmlm.v1.PromptService/Advise": lambda: list(prompt.Advise(prompt_pb.AdviseRequest(patient_id=patient),
                                                                        timeout=TIMEOUT_S)),
            "/pmlm.v1.AuditService/ListReleases": lambda: audit.ListReleases(audit_pb.ListReleasesRequest(),
                                                                             timeout=TIMEOUT_S),
            "/pmlm.v1.AuditService/Verify": lambda: audit.Verify(audit_pb.VerifyRequest(), timeout=TIMEOUT_S),
        }
        for call in calls.values():
            assert_status(call, grpc.StatusCode.PERMISSION_DENIED, f"pmlm-client-{OTHER_SITE}", SITE)
    lines = new_log_lines(site, before)
    assert [line["rpc"] for line in lines] == list(calls)
    assert {line["outcome"] for line in lines} == {"PERMISSION_DENIED"}
    assert all(f"CN=pmlm-client-{OTHER_SITE}" in line["caller"] for line in lines)
    assert [line["patient"] for line in lines] == ["", patient, patient, "", ""]  # who was asked for is kept too
    assert served["prompt"].GetSiteStatus(prompt_pb.GetSiteStatusRequest(), timeout=TIMEOUT_S).site_id == SITE


def test_access_log_has_a_line_per_call_with_its_outcome(served, site):
    before = logged_so_far(site)
    stub, patient = served["prompt"], site["ids"][4]
    stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id=patient), timeout=TIMEOUT_S)
    assert_status(lambda: stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id="nobody"),
                                              timeout=TIMEOUT_S), grpc.StatusCode.NOT_FOUND)
    events = list(stub.Advise(prompt_pb.AdviseRequest(patient_id=patient), timeout=TIMEOUT_S))
    assert events[-1].WhichOneof("event") == "done"
    served["audit"].ListReleases(audit_pb.ListReleasesRequest(), timeout=TIMEOUT_S)
    lines = new_log_lines(site, before)
    assert [(line["rpc"].rsplit("/", 1)[1], line["patient"], line["outcome"]) for line in lines] == [
        ("AssemblePrompt", patient, "OK"), ("AssemblePrompt", "nobody", "NOT_FOUND"), ("Advise", patient, "OK"),
        ("ListReleases", "", "OK")]
    own_subject = lines[0]["caller"]
    assert f"CN=pmlm-client-{SITE}" in own_subject and all(line["caller"] == own_subject for line in lines)
    assert "nobody" in lines[1]["detail"] and "detail" not in lines[0]
    times = [datetime.fromisoformat(line["time"]) for line in lines]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert oct((site["dir"] / "audit" / "access_log.jsonl").stat().st_mode & 0o777) == "0o600"


def test_audit_access_prints_and_filters_by_patient(served, site, capsys):
    patient = site["ids"][5]
    served["prompt"].AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id=patient), timeout=TIMEOUT_S)
    capsys.readouterr()
    assert main(["audit", "access", str(site["dir"]), "--patient", patient]) == 0
    table = capsys.readouterr().out
    assert f"naming patient {patient}" in table and "/pmlm.v1.PromptService/AssemblePrompt" in table
    assert site["ids"][4] not in table  # other patients' calls are filtered out
    assert main(["audit", "access", str(site["dir"]), "--patient", patient, "--json"]) == 0
    calls = json.loads(capsys.readouterr().out)["calls"]
    assert calls and {c["patient"] for c in calls} == {patient} and calls[-1]["outcome"] == "OK"
    assert main(["audit", "access", str(site["dir"]), "--json"]) == 0
    everything = json.loads(capsys.readouterr().out)["calls"]
    assert len(everything) > len(calls) and {c["patient"] for c in everything} > {patient}


def test_audit_access_without_a_log_says_so(tmp_path, capsys):
    assert main(["audit", "access", str(tmp_path)]) != 0
    assert "no access log" in capsys.readouterr().err


def test_allowed_clients_in_site_json_replace_the_default_rule(site, tmp_path):
    site_dir = tmp_path / "allow-list"
    site_dir.mkdir()
    config = json.loads((site["dir"] / "site.json").read_text())
    (site_dir / "site.json").write_text(json.dumps(
        {**config, "allowed_clients": [f"CN=pmlm-client-{OTHER_SITE},O=PMLM consortium"]}))
    state = SiteState(site_dir)
    server, port = start_server(state, "127.0.0.1:0", tls_files(site), max_workers=2)
    request = prompt_pb.GetSiteStatusRequest()
    try:
        with client_channel(site, port, as_site=OTHER_SITE) as listed:
            assert prompt_grpc.PromptServiceStub(listed).GetSiteStatus(request, timeout=TIMEOUT_S).site_id == SITE
        with client_channel(site, port) as not_listed:
            assert_status(lambda: prompt_grpc.PromptServiceStub(not_listed).GetSiteStatus(request, timeout=TIMEOUT_S),
                          grpc.StatusCode.PERMISSION_DENIED)
    finally:
        server.stop(None).wait()
        state.close()


def test_service_without_client_authentication_only_on_loopback(site):
    state = SiteState(site["dir"])
    keys = site["keys"]
    server_only_tls = TlsFiles(keys[f"{SITE}/service-cert"], keys[f"{SITE}/service-key"])
    try:
        with pytest.raises(InsecureServiceError, match="mutual TLS"):
            start_server(state, "127.0.0.1:0", server_only_tls)
        with pytest.raises(InsecureServiceError, match="mutual TLS"):
            start_server(state, "127.0.0.1:0", None)
        for address in ("0.0.0.0:0", "[::]:0", "10.1.2.3:0", "example.org:0"):
            with pytest.raises(InsecureServiceError, match="loopback"):
                start_server(state, address, None, insecure_loopback=True)
        before = logged_so_far(site)
        server, port = start_server(state, "127.0.0.1:0", None, max_workers=2, insecure_loopback=True)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
                status = prompt_grpc.PromptServiceStub(plain).GetSiteStatus(prompt_pb.GetSiteStatusRequest(),
                                                                            timeout=TIMEOUT_S)
            assert status.site_id == SITE
        finally:
            server.stop(None).wait()
        [line] = new_log_lines(site, before)
        assert (line["caller"], line["outcome"]) == ("", "OK")  # logged even without a caller to name
    finally:
        state.close()


@pytest.mark.parametrize("flags, message", [
    (["--insecure-loopback", "--address", "0.0.0.0:50051"], "loopback"),
    (["--insecure-loopback", "--address", "192.168.1.20:50051"], "loopback"),
    (["--cert", "service.pem", "--key", "service.key"], "--client-ca is required"),
    ([], "--cert and --key are required"),
])
def test_pmlm_serve_refuses_an_open_service(site, flags, message, capsys):
    keys = site["keys"]
    flags = [str(keys[f"{SITE}/service-cert"]) if f == "service.pem" else
             str(keys[f"{SITE}/service-key"]) if f == "service.key" else f for f in flags]
    assert main(["serve", "--site", str(site["dir"]), *flags]) != 0
    assert message in capsys.readouterr().err


def test_pmlm_serve_runs_until_sigterm(site):
    keys = site["keys"]
    exe = Path(sys.executable).with_name("pmlm")
    command = [str(exe) if exe.exists() else "pmlm", "serve", "--site", str(site["dir"]), "--address", "127.0.0.1:0",
               "--cert", str(keys[f"{SITE}/service-cert"]), "--key", str(keys[f"{SITE}/service-key"]),
               "--client-ca", str(keys["ca"])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = read_line_with_timeout(process, 60)
        assert "mutual TLS" in line, line
        port = int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
        with client_channel(site, port) as channel:
            status = prompt_grpc.PromptServiceStub(channel).GetSiteStatus(prompt_pb.GetSiteStatusRequest(),
                                                                          timeout=TIMEOUT_S)
        assert status.site_id == SITE
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def read_line_with_timeout(process: subprocess.Popen, timeout_s: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert box, f"pmlm serve printed nothing within {timeout_s} s"
    return box[0]
