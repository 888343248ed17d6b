"""`pmlm audit verify` and `pmlm audit report`, in-process and once as a real subprocess."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pmlm.cli import main
from pmlm.common.privacy import AccountantSettings, BudgetConfig, BudgetExhausted, DpSgd, GaussianRelease, SiteLedger
from pmlm.server.ledger_copy import CoordinatorLedgerCopy

DELTA = 1e-5
FAST = AccountantSettings(pld_value_discretization_interval=1e-2)
BUDGET = BudgetConfig(3.0, DELTA, {"phase_a": 0.5, "phase_b": 0.3, "phase_c": 0.2})


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """Two sites' ledgers and the coordinator's copies, built once (copied per test when changed)."""
    root = tmp_path_factory.mktemp("consortium")
    coordinator = CoordinatorLedgerCopy(root / "coordinator")
    for site_id, n in (("hospital-a", 1200), ("hospital-b", 400)):
        ledger = SiteLedger(root / site_id, site_id, BUDGET, settings=FAST, run_id=f"{site_id}-run1")
        coordinator.accept(site_id, [ledger.open_entry])
        for round_ in range(3):
            # one DP-SGD round among Gaussian ones: RDP of subsampled Gaussians is the slow part to re-price
            mechanism = DpSgd(2.5, 32 / n, 8, 1.0) if round_ == 0 else GaussianRelease(8.0, 1.0)
            _, entry = ledger.release("phase_a", mechanism, lambda: None, round=round_,
                                      population_size=n, noise_source="torch.normal (Opacus, secure_mode=False)")
            coordinator.accept(site_id, [entry])
        _, entry = ledger.release("phase_b", GaussianRelease(6.0, 1.0), lambda: None, round=0, population_size=n,
                                  noise_source="numpy.random.default_rng()")
        coordinator.accept(site_id, [entry])
        with pytest.raises(BudgetExhausted):
            ledger.release("phase_c", GaussianRelease(0.5, 1.0), lambda: None, round=0)
        _, entry = ledger.release("phase_a", GaussianRelease(4.0, 1.0, privacy_unit="site"), lambda: None,
                                  round=3, population_size=4)
        coordinator.accept(site_id, [entry])
    return root


def ledger_path(root: Path, site: str = "hospital-a") -> Path:
    return root / site / "ledger" / "privacy_ledger.jsonl"


def key_path(root: Path, site: str = "hospital-a") -> Path:
    return root / site / "keys" / "site_ed25519.key.pub"


def pinned(root: Path, site: str = "hospital-a") -> list[str]:
    return ["--public-key", f"{site}={key_path(root, site)}"]


@pytest.fixture
def workdir(consortium, tmp_path):
    target = tmp_path / "consortium"
    shutil.copytree(consortium, target)
    return target


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_verify_passes_on_intact_ledgers_and_copies(consortium, capsys):
    paths = [ledger_path(consortium), ledger_path(consortium, "hospital-b"),
             consortium / "coordinator" / "ledger_copies" / "hospital-a.jsonl"]
    code, out, _ = run_cli(["audit", "verify", *map(str, paths), "--anchors", str(consortium / "coordinator")],
                           capsys)
    assert code == 0, out
    assert out.count("OK    ") == 3 and "3 of 3 ledgers verified" in out
    assert "patient-in-site ε=" in out and "site ε=" in out and "pinned key" in out
    assert out.count("holds the head the coordinator anchored (entry 6)") == 2
    assert "of budget 3 at δ=1e-05 (PLD, enforced; RDP bound, looser, not enforced: " in out


@pytest.mark.parametrize("tamper, expected", [
    ("byte", r"entry 2 \(line 3\): signature does not verify"),
    ("reorder", r"entry 3 \(line 3\): sequence number is 3, expected 2"),
    ("delete", r"entry 3 \(line 3\): sequence number is 3, expected 2"),
    ("torn", r"line 8: incomplete last line"),
])
def test_verify_fails_and_names_the_entry(workdir, capsys, tamper, expected):
    path = ledger_path(workdir)
    lines = path.read_bytes().split(b"\n")[:-1]
    if tamper == "byte":
        lines[2] = lines[2].replace(b'"round":1', b'"round":2')
    elif tamper == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
    elif tamper == "delete":
        del lines[2]
    data = b"".join(line + b"\n" for line in lines)
    if tamper == "torn":
        data += b'{"seq":7,"kind":"rel'
    path.write_bytes(data)
    code, out, _ = run_cli(["audit", "verify", str(path), *pinned(workdir)], capsys)
    assert code == 1
    fail_line = next(line for line in out.splitlines() if line.startswith("FAIL"))
    assert re.search(expected, fail_line), fail_line
    assert "0 of 1 ledgers verified" in out


def test_verify_needs_a_pinned_key_not_the_one_beside_the_ledger(workdir, capsys):
    path = ledger_path(workdir)
    assert key_path(workdir).is_file()  # right beside it, and still not trusted
    code, out, _ = run_cli(["audit", "verify", str(path)], capsys)
    assert code == 1 and "only the ledger's internal consistency was checked" in out
    assert "--public-key hospital-a=FILE" in out and "--anchors" in out and "--fingerprint" in out
    code, out, _ = run_cli(["audit", "verify", str(path), "--trust-embedded-key"], capsys)
    assert code == 0 and "only internal consistency checked" in out
    assert run_cli(["audit", "verify", str(path), "--key", f"hospital-a={key_path(workdir)}"], capsys)[0] == 0
    other = key_path(workdir, "hospital-b")
    code, out, _ = run_cli(["audit", "verify", str(path), "--public-key", f"hospital-a={other}"], capsys)
    assert code == 1 and "entry 0 (line 1)" in out and "not the trusted site key" in out
    assert run_cli(["audit", "verify", str(path), "--public-key", "nonsense"], capsys)[0] == 2
    assert run_cli(["audit", "verify", str(path), "--fingerprint", "hospital-a=abc"], capsys)[0] == 2


def test_verify_takes_a_site_directory_and_a_pinned_fingerprint(workdir, capsys):
    from pmlm.common.privacy.signing import key_fingerprint, load_public_key

    fingerprint = key_fingerprint(load_public_key(key_path(workdir)))
    code, out, _ = run_cli(["audit", "verify", str(workdir / "hospital-a"), "--fingerprint",
                            f"hospital-a={fingerprint}"], capsys)
    assert code == 0 and f"OK    {ledger_path(workdir)}" in out and f"--fingerprint {fingerprint[7:]}" in out


def test_verify_with_the_anchors_catches_a_truncated_ledger(workdir, capsys):
    path = ledger_path(workdir)
    path.write_bytes(b"".join(line + b"\n" for line in path.read_bytes().split(b"\n")[:-3]))  # last two gone
    # The pinned key alone cannot see it: what is left is consistent, and the hospital-level release is gone.
    code, out, _ = run_cli(["audit", "verify", str(path), *pinned(workdir)], capsys)
    assert code == 0 and "patient-in-site ε=" in out and ", site ε=" not in out
    code, out, _ = run_cli(["audit", "verify", str(path), "--anchors", str(workdir / "coordinator")], capsys)
    fail_line = next(line for line in out.splitlines() if line.startswith("FAIL"))
    assert code == 1 and "truncated" in fail_line and "2 entries are missing" in fail_line, out


def test_a_rekeyed_resigned_ledger_with_a_bigger_budget_fails_against_the_pin(workdir, capsys, tmp_path):
    from pmlm.common.privacy.signing import key_fingerprint, load_public_key

    original_key = key_path(workdir)
    fingerprint = key_fingerprint(load_public_key(original_key))
    forged_site = tmp_path / "forged" / "hospital-a"
    forged = SiteLedger(forged_site, "hospital-a", BudgetConfig(100.0, DELTA, BUDGET.shares), settings=FAST)
    for round_ in range(7):  # past the anchored head (entry 6), so only its content can give it away
        forged.release("phase_a", GaussianRelease(8.0, 1.0), lambda: None, round=round_, noise_source="test")
    shutil.rmtree(workdir / "hospital-a" / "ledger")
    shutil.copytree(forged_site / "ledger", workdir / "hospital-a" / "ledger")
    shutil.copy(forged.public_key_path, original_key)  # the key beside it replaced too
    path = ledger_path(workdir)
    assert run_cli(["audit", "verify", str(path), "--trust-embedded-key"], capsys)[0] == 0  # consistent
    for pin, expected in ((["--fingerprint", f"hospital-a={fingerprint}"], "does not match the pinned fingerprint"),
                          (["--public-key", f"hospital-a={workdir / 'coordinator/site_keys/hospital-a.pub'}"],
                           "not the trusted site key"),
                          (["--anchors", str(workdir / "coordinator")], "diverges from the anchored head")):
        code, out, _ = run_cli(["audit", "verify", str(path), *pin], capsys)
        assert code == 1 and expected in out, (pin, out)


def test_verify_catches_an_edited_coordinator_copy(workdir, capsys):
    path = workdir / "coordinator" / "ledger_copies" / "hospital-b.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"round":2', b'"round":9', 1))
    code, out, _ = run_cli(["audit", "verify", str(path)], capsys)
    assert code == 1 and "coordinator copy" in out and "line 4" in out


def test_verify_as_a_subprocess(workdir):
    intact, tampered = ledger_path(workdir, "hospital-b"), ledger_path(workdir)
    tampered.write_bytes(tampered.read_bytes().replace(b'"round":0', b'"round":5', 1))
    result = subprocess.run([sys.executable, "-m", "pmlm", "audit", "verify", str(intact), str(tampered),
                             "--anchors", str(workdir / "coordinator")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith(f"OK    {intact}")
    assert out[1].startswith(f"FAIL  {tampered}") and "entry 1 (line 2): signature does not verify" in out[1]
    assert out[-1] == "1 of 2 ledgers verified"


def test_verify_takes_a_folder_of_sites_and_says_what_a_directory_lacks(workdir, capsys, tmp_path):
    code, out, _ = run_cli(["audit", "verify", str(workdir), "--anchors", str(workdir / "coordinator")], capsys)
    assert code == 0 and "2 of 2 ledgers verified" in out, out
    assert f"OK    {ledger_path(workdir)}" in out and f"OK    {ledger_path(workdir, 'hospital-b')}" in out
    code, _, err = run_cli(["audit", "verify", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} is a directory but holds no site ledger" in err
    code, _, err = run_cli(["audit", "verify", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no such ledger file or site directory" in err


def test_verify_prints_only_ledger_lines_unless_verbose(tmp_path):
    """dp-accounting's RDP accountant logs a warning per order it skips (72 lines for the demo's ledgers, through
    absl); the console shows them only with --verbose, and --log-file keeps them."""
    site = tmp_path / "hospital-q"
    ledger = SiteLedger(site, "hospital-q", BudgetConfig(10.0, DELTA, BUDGET.shares), settings=FAST)
    ledger.release("phase_a", DpSgd(3.511719, 0.5, 2, 1.0), lambda: None, round=0, population_size=40,
                   noise_source="test")  # q = 0.5: RDP's series fails to converge at small orders
    command = [sys.executable, "-m", "pmlm", "audit", "verify", str(site), "--trust-embedded-key"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    lines = (quiet.stdout + quiet.stderr).splitlines()
    assert lines and all(line.startswith(("OK    ", "1 of 1 ledgers verified")) for line in lines), lines
    assert not any("WARNING" in line or "absl" in line for line in lines)
    log_file = tmp_path / "verify.log"
    verbose = subprocess.run([*command, "--verbose", "--log-file", str(log_file)], capture_output=True, text=True,
                             timeout=120)
    assert verbose.returncode == 0 and "absl" in verbose.stderr and "failed to converge" in verbose.stderr
    assert verbose.stdout == quiet.stdout
    assert "failed to converge" in log_file.read_text()


def test_report_html_and_json(consortium, capsys, tmp_path):
    out_dir = tmp_path / "report"
    paths = [ledger_path(consortium), ledger_path(consortium, "hospital-b")]
    code, out, err = run_cli(["audit", "report", *map(str, paths), "--out", str(out_dir), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert json.loads((out_dir / "privacy_summary.json").read_text()) == summary
    for site_id in ("hospital-a", "hospital-b"):
        site = summary[site_id]
        ledger = SiteLedger(consortium / site_id, site_id)
        assert site["epsilon"] == pytest.approx(ledger.spent().pld, rel=1e-12)
        assert site["epsilon_rdp"] == pytest.approx(ledger.spent().rdp, rel=1e-12)
        assert site["delta"] == DELTA
        assert site["budget"]["epsilon_total"] == 3.0 and site["budget"]["shares"] == BUDGET.shares
        assert site["budget"]["remaining"] == pytest.approx(3.0 - ledger.spent().pld)
        assert site["releases"] == 5 and site["refusals"] == 1 and site["verified"] is True
        assert site["by_unit"]["site"]["epsilon"] == pytest.approx(ledger.spent("site").pld)

    page = (out_dir / "privacy_report.html").read_text()
    assert page.count("<svg") >= 5  # budget bars + two charts per site and unit
    assert "<script" not in page and "<link" not in page and "src=" not in page  # self-contained
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)
    for phrase in ("All ledgers verified", "adding or removing all records of any one patient",
                   "honest-but-curious", "1/n", "n = 1,200 patients", "privacy-loss-distribution",
                   "dp-accounting 0.6", "Opacus secure mode", "torch.normal (Opacus, secure_mode=False)",
                   "refusal", "Every release", "ε (PLD, enforced)", "RDP bound (looser, not enforced)",
                   "an RDP figure\nabove the budget is not an overrun"):
        assert phrase in page, phrase
    assert "ε (RDP)" not in page and "(RDP)" not in page  # never an unlabelled RDP figure, nor an RDP curve


def test_report_of_a_tampered_ledger_says_so(workdir, capsys, tmp_path):
    path = ledger_path(workdir)
    path.write_bytes(path.read_bytes().replace(b'"round":1', b'"round":2', 1))
    code, _, err = run_cli(["audit", "report", str(path), "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "failed verification" in err
    page = (tmp_path / "r" / "privacy_report.html").read_text()
    assert "FAILED verification" in page and "entry 2 (line 3)" in page


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(consortium, tmp_path, capsys):
    out_dir = tmp_path / "report"
    assert run_cli(["audit", "report", str(ledger_path(consortium)), "--out", str(out_dir)], capsys)[0] == 0
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             f"--screenshot={shot}", "--window-size=1200,1600", (out_dir / "privacy_report.html").as_uri()],
            capture_output=True, timeout=120, check=True,
        )
    assert _png_size(shot) == (1200, 1600)
    assert shot.stat().st_size > 30_000  # a blank or error page compresses to a few kB
