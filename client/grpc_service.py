"""The hospital's on-site gRPC services (pmlm.v1.PromptService and pmlm.v1.AuditService) over TLS.

The EHR system and clinician tools call PromptService for a patient's personalised prompt and the
LLM's guidance; auditors call AuditService for the privacy ledger. Both read the site directory the
SuperNode writes (ledger, keys, global artifacts) and the records named by its site.json.

Request problems become clear statuses, never a dead server: a message that is not valid protobuf
or breaks a rule (empty patient id, a prompt parameter out of range) -> INVALID_ARGUMENT, an unknown
patient -> NOT_FOUND, a site without records or ledger -> FAILED_PRECONDITION, the LLM down ->
UNAVAILABLE, no turn at the LLM before the call's deadline -> RESOURCE_EXHAUSTED.

The site trusts no caller by default. Mutual TLS with the site's client CA is required (plaintext or
no client certificate only on a loopback address, when the operator asks for it), and a certificate
from that CA is not enough: its subject must name this site (`pmlm deploy certs` issues
CN=pmlm-client-SITE), or be listed in site.json's "allowed_clients", else every call answers
PERMISSION_DENIED. A consortium CA signs every hospital's certificates, so without this check
hospital B's client certificate would read hospital A's patients. Every call, allowed or denied,
is written to the site's access log (client/access_log.py) before its answer leaves.

Advise calls wait for the LLM in a worker thread, so the pool is larger than the LLM's own capacity:
with 8 workers and 32 clients, waiting Advise calls held every worker and AssemblePrompt calls queued
behind them for a minute (bench/serve.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import threading
from concurrent import futures
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID
from google.protobuf.message import DecodeError

from pmlm.client.access_log import AccessLog
from pmlm.client.assemble.assembler import PromptAssembler, SiteArtifacts
from pmlm.client.assemble.check import (AnswerCheck, CareChecklist, advice_notice, care_checklist, check_advice,
                                        model_label)
from pmlm.client.examples import build_examples
from pmlm.client.ingest import RecordReader
from pmlm.client.llm import LLMBusy, LLMConfig, LLMError, open_llm, site_llm_config
from pmlm.client.reward import matcher_for
from pmlm.client.site_config import SiteConfig, SiteConfigError
from pmlm.common.assemble.render import PromptParams
from pmlm.common.privacy.ledger import verify_ledger
from pmlm.common.privacy.signing import KeyFileError, key_fingerprint, load_public_key, public_path
from pmlm.common.profiles import load_profile
from pmlm.common.site_layout import LEDGER_PATH, PEER_PROFILES, POLICY, SITE_KEY_PATH, SITE_POLICY, current_manifest
from pmlm.v1 import audit_service_pb2 as audit_pb
from pmlm.v1 import prompt_service_pb2 as prompt_pb

log = logging.getLogger(__name__)

MAX_PATIENT_ID = 200
MAX_QUESTION = 2000
PRIVACY_UNIT = "patient-in-site"
PHASE_ARTIFACTS = {"phase_b": PEER_PROFILES.with_suffix(".npz"), "phase_c": POLICY}  # phase A: current_manifest("phase_a")
CLIENT_CN_PREFIX = "pmlm-client-"  # + site id: the client certificate `pmlm deploy certs` issues per site


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: Exception):
        self.message = f"request is not a valid {type_name}: {error}"


@dataclass
class Patient:
    timeline: Any
    example: Any


class SiteState:
    """What both services read from one site directory; records and artifacts are loaded on first use."""

    def __init__(self, site_dir: Path, llm_config: LLMConfig | None = None):
        self.site_dir = Path(site_dir).resolve()
        self.config = SiteConfig.load(self.site_dir)
        self.profile = load_profile(self.config.profile)
        self.llm_config = llm_config or site_llm_config(self.site_dir, self.config.llm)
        self._lock = threading.Lock()
        self._patients: dict[str, Any] | None = None
        self._assembler: tuple[tuple, PromptAssembler] | None = None
        self._ledger: tuple[tuple, Any] | None = None
        self._llm_stack = contextlib.ExitStack()
        self._llm = None
        self.access_log = AccessLog(self.site_dir)
        self.allow_unauthenticated = False  # set by start_server for an --insecure-loopback service only

    def authorises(self, caller: "Caller") -> bool:
        """Whether this caller may use the site's services: its certificate names this site, or site.json lists it."""
        if caller.subject is None:
            return self.allow_unauthenticated
        if self.config.allowed_clients:  # the site's explicit list replaces the default rule
            return caller.subject in self.config.allowed_clients
        return caller.common_name == CLIENT_CN_PREFIX + self.config.site_id

    # -- records and prompt -----------------------------------------------------------------------

    def timelines(self) -> dict[str, Any]:
        """Every patient's timeline, read once (a site's export changes by redeploying the service)."""
        with self._lock:
            if self._patients is None:
                data_dir = Path(self.config.data_dir)
                if not data_dir.exists():
                    raise SiteConfigError(f"the site's data_dir {data_dir} does not exist")
                self._patients = {t.patient_id: t for t in RecordReader(data_dir)}
            return self._patients

    def patient(self, patient_id: str) -> Patient:
        timeline = self.timelines().get(patient_id)
        if timeline is None:
            raise LookupError(f"patient {patient_id!r} is not in this site's records")
        examples = build_examples(timeline, self.profile, site=self.config.site_id)
        if not examples:
            raise LookupError(f"patient {patient_id!r} has no {self.profile.name} prediction point on record")
        return Patient(timeline, examples[-1])

    def assembler(self) -> PromptAssembler:
        """The site's artifacts, reloaded when a new run stored new ones."""
        stamp = tuple(_mtime(self.site_dir / p)
                      for p in (current_manifest("phase_a"), *PHASE_ARTIFACTS.values(), SITE_POLICY))
        with self._lock:
            if self._assembler is None or self._assembler[0] != stamp:
                self._assembler = (stamp, PromptAssembler(SiteArtifacts.load(self.site_dir, self.profile)))
            return self._assembler[1]

    def llm(self):
        with self._lock:
            if self._llm is None:
                self._llm = self._llm_stack.enter_context(open_llm(self.llm_config))
            return self._llm

    # -- ledger -------------------------------------------------------------------------------------

    def ledger(self, trusted_pem: bytes = b""):
        """The ledger re-checked against the site key (or the auditor's); cached while the file is unchanged."""
        path = self.site_dir / LEDGER_PATH
        if not path.is_file():
            raise SiteConfigError(f"no privacy ledger at {path} yet: this site has released nothing")
        if trusted_pem:
            return verify_ledger(path, _public_key_from_pem(trusted_pem)), _public_key_from_pem(trusted_pem)
        key = load_public_key(public_path(self.site_dir / SITE_KEY_PATH))
        stamp = (path.stat().st_size, path.stat().st_mtime_ns)
        with self._lock:
            if self._ledger is None or self._ledger[0] != stamp:
                self._ledger = (stamp, verify_ledger(path, key))
            return self._ledger[1], key

    def close(self) -> None:
        self._llm_stack.close()


class PromptServicer:
    def __init__(self, site: SiteState):
        self.site = site

    def _assemble(self, request) -> prompt_pb.AssemblePromptResponse:
        return self._assembled(request)[0]

    def _assembled(self, request):
        """(the AssemblePromptResponse, the Assembled prompt it shows, her Patient)."""
        patient_id = request.patient_id.strip()
        if not patient_id or len(patient_id) > MAX_PATIENT_ID:
            raise ValueError(f"patient_id must be 1 to {MAX_PATIENT_ID} characters")
        if len(request.question) > MAX_QUESTION:
            raise ValueError(f"question is longer than {MAX_QUESTION} characters")
        params = _prompt_params(request.params) if request.HasField("params") else None
        patient = self.site.patient(patient_id)
        assembler = self.site.assembler()
        assembled = assembler.assemble(patient.example, patient.timeline, request.question.strip() or None, params)
        prompt = assembled.prompt
        return prompt_pb.AssemblePromptResponse(
            messages=[prompt_pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt.messages],
            facts=[prompt_pb.Fact(text=fact, source=source) for fact, source in prompt.sources],
            approx_tokens=prompt.approx_tokens, visit=self.site.profile.name_of(patient.example.point),
            used_global_model=assembler.a.model is not None, missing=assembled.missing,
            refined_by_policy=assembled.policy is not None, policy=assembled.policy or "",
            checklist=_checklist(care_checklist(assembled))), assembled, patient

    def AssemblePrompt(self, request, context):
        return self._assemble(request)

    def Advise(self, request, context) -> Iterator[prompt_pb.AdviseEvent]:
        assembled, built, patient = self._assembled(request)
        yield prompt_pb.AdviseEvent(prompt=assembled)  # her care checklist comes first, with the prompt
        # The LLM client answers whole completions; the answer is passed on line by line so a
        # clinician's screen fills as the stream arrives. Calls beyond what the LLM serves at once wait
        # their turn for as long as this call's deadline allows, less a margin: waiting all of it, the caller's
        # deadline passed before RESOURCE_EXHAUSTED could reach it (it saw DEADLINE_EXCEEDED).
        remaining = context.time_remaining()
        wait_s = None if remaining is None else max(0.0, remaining - min(1.0, 0.2 * remaining))
        completion = self.site.llm().chat([{"role": m.role, "content": m.content} for m in assembled.messages],
                                          wait_s=wait_s)
        check = check_advice(completion.text, built, patient.example, matcher_for(self.site.config.profile))
        for piece in check.text.splitlines(keepends=True):  # the answer less the items beyond what her prompt allows
            if not context.is_active():
                return
            yield prompt_pb.AdviseEvent(text=piece)
        yield prompt_pb.AdviseEvent(done=prompt_pb.AdviseDone(
            model=completion.model or "", prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens, elapsed_s=completion.elapsed_s,
            check=_answer_check(check), notice=advice_notice(model_label(self.site.llm_config, completion.model))))

    def GetSiteStatus(self, request, context) -> prompt_pb.SiteStatus:
        site_dir = self.site.site_dir
        status = prompt_pb.SiteStatus(site_id=self.site.config.site_id, artifacts=_artifacts(site_dir))
        if not (site_dir / LEDGER_PATH).is_file():
            return status
        replay, _ = self.site.ledger()
        if replay.problems:
            raise SiteConfigError(f"the privacy ledger does not verify: {replay.problems[0]}")
        budget, state = replay.budget, replay.state
        status.ledger_present = True
        status.epsilon_spent = state.spent(PRIVACY_UNIT).pld
        status.epsilon_remaining = state.remaining(PRIVACY_UNIT)
        status.epsilon_total, status.delta = budget.epsilon_total, budget.delta
        status.phases.extend(prompt_pb.PhaseBudget(phase=phase, epsilon_spent=state.spent(PRIVACY_UNIT, phase).pld,
                                                   epsilon_cap=budget.phase_cap(phase))
                             for phase in sorted(budget.shares))
        status.releases = sum(1 for e in replay.entries if e.get("kind") == "release")
        return status


class AuditServicer:
    def __init__(self, site: SiteState):
        self.site = site

    def ListReleases(self, request, context) -> audit_pb.ListReleasesResponse:
        replay, _ = self.site.ledger()
        kinds = ("release", "refusal", "recovery") if request.include_refusals else ("release",)
        entries = [e for e in replay.entries if e.get("kind") in kinds and (not request.phase or e.get("phase") == request.phase)]
        return audit_pb.ListReleasesResponse(site_id=replay.site_id or "", entries=[_ledger_entry(e) for e in entries])

    def Verify(self, request, context) -> audit_pb.VerifyResponse:
        replay, key = self.site.ledger(request.trusted_public_key)
        epsilon = replay.state.spent(PRIVACY_UNIT).pld if replay.state is not None else 0.0
        return audit_pb.VerifyResponse(ok=replay.ok, entries=len(replay.entries),
                                       problems=[str(p) for p in replay.problems],
                                       key_fingerprint=key_fingerprint(key), epsilon=epsilon)


def _checklist(checklist: CareChecklist) -> prompt_pb.CareChecklist:
    return prompt_pb.CareChecklist(
        stage=checklist.stage or "", horizon_weeks=checklist.horizon_weeks or 0, peer_group=checklist.peer_group,
        items=[prompt_pb.ChecklistItem(section=i.section, text=i.text, source=i.source, probability=i.probability)
               for i in checklist.items],
        left_out=[prompt_pb.LeftOutItem(text=x.text, source=x.source, reason=x.why) for x in checklist.left_out])


def _answer_check(check: AnswerCheck) -> prompt_pb.AnswerCheck:
    return prompt_pb.AnswerCheck(allowed_items=check.allowed or 0, items=[
        prompt_pb.CheckedItem(text=i.text, reasons=i.reasons, removed=i.removed) for i in check.items])


# -- request checking and error statuses -------------------------------------------------------------

STATUS_OF: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (SiteConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (KeyFileError, grpc.StatusCode.FAILED_PRECONDITION),
    (FileNotFoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (LookupError, grpc.StatusCode.NOT_FOUND),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (LLMBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LLMError, grpc.StatusCode.UNAVAILABLE),
]


def _status_for(exc: BaseException) -> grpc.StatusCode | None:
    return next((code for kind, code in STATUS_OF if isinstance(exc, kind)), None)


@dataclass(frozen=True)
class Caller:
    subject: str | None  # RFC 4514 subject of the client certificate; None: no certificate (loopback only)
    common_name: str = ""

    @property
    def logged_as(self) -> str:
        return self.subject or ""


def caller_of(context) -> Caller:
    """Who is calling, from the client certificate the TLS handshake verified."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    if not pems:
        return Caller(None)
    cert = x509.load_pem_x509_certificate(pems[0])
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Caller(cert.subject.rfc4514_string(), str(names[0].value) if names else "")


class _CallRecord:
    """One call's line in the access log, and the refusal of callers the site does not admit."""

    def __init__(self, site: SiteState, rpc: str, request, context):
        self.site, self.rpc = site, rpc
        asked_for = "" if isinstance(request, MalformedRequest) else str(getattr(request, "patient_id", ""))
        self.patient = asked_for[:MAX_PATIENT_ID]
        self.caller = caller_of(context)
        if not site.authorises(self.caller):
            who = self.caller.subject or "a caller without a client certificate"
            self.finish(grpc.StatusCode.PERMISSION_DENIED, f"{who} is not authorised for site {site.config.site_id}",
                        context, strict=False)
        if isinstance(request, MalformedRequest):
            self.finish(grpc.StatusCode.INVALID_ARGUMENT, request.message, context)

    def finish(self, code: grpc.StatusCode, detail: str = "", context=None, *, strict: bool = True) -> None:
        """Log the call's outcome; with a context and an error code, end the call with that status.

        A line that cannot be written ends the call with INTERNAL (strict): an access the log does not
        show is not served. A denial is answered PERMISSION_DENIED whether or not its line was written.
        """
        try:
            self.site.access_log.record(self.caller.logged_as, self.rpc, self.patient, code.name,
                                        "" if code == grpc.StatusCode.OK else detail)
        except OSError as exc:
            log.error("access log %s not written: %s", self.site.access_log.path, exc)
            if strict and context is not None:
                context.abort(grpc.StatusCode.INTERNAL, "the site's access log cannot be written; call refused")
        if context is not None and code != grpc.StatusCode.OK:
            context.abort(code, detail)


def _failure(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code = _status_for(exc)
    if code is None:
        log.exception("unexpected error in a pmlm.v1 call")
        return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the service log"
    return code, str(exc)


def _unary(behaviour: Callable, site: SiteState, rpc: str) -> Callable:
    def handle(request, context):
        call = _CallRecord(site, rpc, request, context)
        try:
            reply = behaviour(request, context)
        except Exception as exc:  # every failure answers with a status; the server keeps serving
            call.finish(*_failure(exc), context)
        call.finish(grpc.StatusCode.OK, context=context)  # logged before the reply leaves
        return reply
    return handle


def _streaming(behaviour: Callable, site: SiteState, rpc: str) -> Callable:
    def handle(request, context):
        call = _CallRecord(site, rpc, request, context)
        try:
            yield from behaviour(request, context)
        except GeneratorExit:  # the client went away and grpc closed the stream
            call.finish(grpc.StatusCode.CANCELLED, "the client cancelled the stream")
            raise
        except Exception as exc:
            call.finish(*_failure(exc), context)
        if context.is_active():
            call.finish(grpc.StatusCode.OK)
        else:
            call.finish(grpc.StatusCode.CANCELLED, "the client cancelled the stream")
    return handle


def _tolerant_parser(message_class) -> Callable[[bytes], Any]:
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, exc)
    return parse


def service_handler(service_descriptor, servicer, messages_module, site: SiteState) -> grpc.GenericRpcHandler:
    """The service's method table, built from its descriptor, with requests parsed tolerantly.

    grpc's generated add_*_to_server would answer a request that fails to parse with a bare
    INTERNAL status; here it gets INVALID_ARGUMENT naming the message type.
    """
    handlers = {}
    for method in service_descriptor.methods:
        request_class = getattr(messages_module, method.input_type.name)
        response_class = getattr(messages_module, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        wrap = _streaming if method.server_streaming else _unary
        rpc = f"/{service_descriptor.full_name}/{method.name}"
        handlers[method.name] = make(wrap(behaviour, site, rpc), request_deserializer=_tolerant_parser(request_class),
                                     response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers)


def _prompt_params(message) -> PromptParams:
    given = {f.name: getattr(message, f.name) for f in fields(PromptParams) if message.HasField(f.name)}
    return PromptParams(**given)  # ValueError names the parameter and its allowed values


def _artifacts(site_dir: Path) -> list[prompt_pb.Artifact]:
    found = []
    for manifest_path in sorted(site_dir.glob(str(current_manifest("*")))):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            continue
        found.append(prompt_pb.Artifact(phase=str(manifest.get("phase", manifest_path.parent.name)),
                                        path=str(manifest.get("path", manifest_path.relative_to(site_dir))),
                                        run_id=str(manifest.get("run_id", "")), round=int(manifest.get("round", 0))))
    for phase, relative in PHASE_ARTIFACTS.items():
        if (site_dir / relative).is_file():
            found.append(prompt_pb.Artifact(phase=phase, path=str(relative)))
    if (site_dir / SITE_POLICY).is_file():  # the site's own refinement of the phase C policy (client/refine.py)
        found.append(prompt_pb.Artifact(phase="on_site", path=str(SITE_POLICY)))
    return found


def _ledger_entry(entry: dict[str, Any]) -> audit_pb.LedgerEntry:
    def number(key: str) -> float:
        value = entry.get(key)
        return float(value) if isinstance(value, (int, float)) else 0.0
    return audit_pb.LedgerEntry(
        seq=int(entry.get("seq", 0)), kind=str(entry.get("kind", "")), time=str(entry.get("time", "")),
        run_id=str(entry.get("run_id") or ""), phase=str(entry.get("phase") or ""),
        round=int(entry.get("round") or 0), privacy_unit=str(entry.get("privacy_unit") or ""),
        epsilon=number("epsilon"), epsilon_rdp=number("epsilon_rdp"), phase_epsilon=number("phase_epsilon"),
        mechanism_json=json.dumps(entry.get("mechanism", {}), sort_keys=True),
        entry_json=json.dumps(entry, sort_keys=True, separators=(",", ":")))


def _public_key_from_pem(pem: bytes):
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"trusted_public_key is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("trusted_public_key must be an Ed25519 public key")
    return key


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


# -- the server ---------------------------------------------------------------------------------------

@dataclass
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # mutual TLS with clients of this CA; None only for an insecure loopback service


class InsecureServiceError(ValueError):
    """The service was asked to run without client authentication somewhere other than loopback."""


LOOPBACK_HOSTS = ("localhost",)


def is_loopback_address(address: str) -> bool:
    """Whether host:port (or [v6]:port) binds only this machine: 127.0.0.0/8, ::1 or localhost."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]").lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_server(site: SiteState, address: str, tls: TlsFiles | None, max_workers: int = 32, *,
                 insecure_loopback: bool = False) -> tuple[grpc.Server, int]:
    """Serve both services on `address` (host:port, port 0 = any free one); returns the bound port.

    Mutual TLS unless `insecure_loopback`: then `tls` may be None (plaintext) or lack its client CA
    (server-side TLS only), callers need no certificate, and `address` must be a loopback one.
    """
    closed = tls is not None and tls.client_ca is not None
    if not closed and not insecure_loopback:
        raise InsecureServiceError("the site's services need mutual TLS: give the client CA (--client-ca), or "
                                   "--insecure-loopback to serve without client certificates on loopback only")
    if insecure_loopback and not is_loopback_address(address):
        raise InsecureServiceError(f"--insecure-loopback serves only on a loopback address (127.0.0.0/8, ::1, "
                                   f"localhost), not {address}")
    site.allow_unauthenticated = not closed
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pmlm-grpc"),
                         maximum_concurrent_rpcs=4 * max_workers)
    server.add_generic_rpc_handlers([
        service_handler(prompt_pb.DESCRIPTOR.services_by_name["PromptService"], PromptServicer(site), prompt_pb, site),
        service_handler(audit_pb.DESCRIPTOR.services_by_name["AuditService"], AuditServicer(site), audit_pb, site),
    ])
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None)
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    return server, port
