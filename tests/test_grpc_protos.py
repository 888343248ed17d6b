"""The committed pmlm.v1 code is what protos/ generates today, and the contracts keep their shape.

Regenerate with the command in pmlm/v1/__init__.py. The comparison ignores only the version stamps
that grpcio-tools writes (another grpcio-tools release would change them, not the contract).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from pmlm.v1 import audit_service_pb2, prompt_service_pb2

REPO = Path(__file__).resolve().parents[1]
PROTOS = sorted((REPO / "protos" / "pmlm" / "v1").glob("*.proto"))
GENERATED = REPO / "pmlm" / "v1"
VERSION_STAMPS = [re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
                  re.compile(r"^# Protobuf Python Version: .*$", re.M),
                  re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", re.S)]


def without_stamps(text: str) -> str:
    for stamp in VERSION_STAMPS:
        text = stamp.sub("<version>", text)
    return text


def test_generated_code_is_current(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (dev extra) generates the code")
    args = ["protoc", f"-I{REPO / 'protos'}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}", *map(str, PROTOS)]
    assert protoc.main(args) == 0
    fresh = sorted(p.relative_to(tmp_path / "pmlm" / "v1") for p in (tmp_path / "pmlm" / "v1").iterdir())
    committed = sorted(p.relative_to(GENERATED) for p in GENERATED.iterdir()
                       if p.suffix in (".py", ".pyi") and p.name != "__init__.py")
    assert fresh == committed, "regenerate pmlm/v1 from protos/ (see pmlm/v1/__init__.py)"
    for name in fresh:
        new, old = (tmp_path / "pmlm" / "v1" / name).read_text(), (GENERATED / name).read_text()
        assert without_stamps(new) == without_stamps(old), f"pmlm/v1/{name} is stale: regenerate it from protos/"


def test_services_have_the_issue_s_methods():
    prompt = prompt_service_pb2.DESCRIPTOR.services_by_name["PromptService"]
    audit = audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"]
    assert prompt_service_pb2.DESCRIPTOR.package == audit_service_pb2.DESCRIPTOR.package == "pmlm.v1"
    methods = {m.name: m.server_streaming for m in (*prompt.methods, *audit.methods)}
    assert methods == {"AssemblePrompt": False, "Advise": True, "GetSiteStatus": False,
                       "ListReleases": False, "Verify": False}


def test_descriptor_round_trips():
    """The serialized descriptors in the modules parse back (the files were not hand-edited)."""
    for module in (prompt_service_pb2, audit_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        assert proto.package == "pmlm.v1" and proto.service
