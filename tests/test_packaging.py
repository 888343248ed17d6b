"""The wheel puts everything under one `pmlm` namespace and carries the profiles; the Flower app is declared."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_has_one_namespace_and_the_profiles(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("pmlm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pmlm", next(t for t in tops if t.endswith(".dist-info"))}
    for module in ("pmlm/common/schema.py", "pmlm/client/ingest/fhir.py", "pmlm/server/__init__.py",
                   "pmlm/cli.py", "pmlm/common/profiles/obgyn.json", "pmlm/common/profiles/chronic.json"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "pmlm = pmlm.cli:main" in entry_points


def test_pyproject_declares_the_flower_app_and_pins():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    components = meta["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "pmlm.server.server_app:app", "clientapp": "pmlm.client.node_app:app"}
    deps = " ".join(meta["project"]["dependencies"])
    assert "torch==2.13.0" in deps and "protobuf>=6.33.5,<7" in deps
    assert any(d.startswith("grpcio-tools<1.82") for d in meta["project"]["optional-dependencies"]["dev"])
