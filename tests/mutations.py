"""Break the privacy guarantee on purpose, one way at a time, and check that the tests notice (issue #22).

    .venv/bin/python tests/mutations.py            # every mutation; exit 0 only if each one is caught
    .venv/bin/python tests/mutations.py --list     # what would be run
    .venv/bin/python tests/mutations.py --only "phase B noise / 10"

Each mutation is a one-line change to the product code that weakens what a site really releases (less noise,
a looser clip, no budget check, a smaller sensitivity on record than the one used, a count sent exact, no
per-patient bound, a kept release re-sent to a smaller secure-sum group) while leaving the ledger's bookkeeping
intact; one more makes the coordinator wait for a hung site without its round-timeout. The working tree is never touched: the
packages (pmlm, client, common, server) are copied into a temporary folder laid out as the installed
`pmlm` package, each mutation is written into that copy, and the relevant tests run in a subprocess whose
working directory is the copy, so `import pmlm` finds it before the editable install (which Python consults
last). Other people may edit the real files meanwhile; they are only read, once, at the start.

First the unmutated copy must pass the same tests (otherwise a "caught" would mean nothing), then every
mutation must make at least one of them fail. A mutation whose text is no longer in its file stops the
script: the list has to follow the code. Prints a table: mutation, the tests that caught it, seconds.
Named without the test_ prefix so that pytest does not collect it; about 4.5 minutes of CPU (12 minutes on two
cores shared with other jobs, 2026-12-06).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"pmlm": "pmlm", "client": "pmlm/client", "common": "pmlm/common", "server": "pmlm/server"}
NOISE_TESTS = "tests/test_noise_mechanism.py"
FAULT_TESTS = "tests/test_release_faults.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # in the repository
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments (files, -k expressions)


def noise_tests(keyword: str) -> tuple[str, ...]:
    return (NOISE_TESTS, "-k", keyword)


MUTATIONS = [
    # -- phase A: what Opacus is told
    Mutation("phase A noise / 10", "client/train.py",
             "data_loader=loader, noise_multiplier=settings.noise_multiplier,",
             "data_loader=loader, noise_multiplier=settings.noise_multiplier / 10,",
             noise_tests("phase_a")),
    Mutation("phase A clip x 100", "client/train.py",
             "max_grad_norm=settings.clipping_norm,", "max_grad_norm=settings.clipping_norm * 100,",
             noise_tests("phase_a")),
    Mutation("phase A sensitivity halved on record", "client/phase_a.py",
             'plan["patient_clip"])\n', 'plan["patient_clip"] / 2)\n', noise_tests("phase_a")),
    # -- the ledger: pricing before noise, for every phase
    Mutation("budget check removed (every release fits)", "common/privacy/ledger.py",
             "        if charge.fits:\n            return charge\n",
             "        if True:  # mutated\n            return charge\n", noise_tests("refuse")),
    Mutation("noise drawn (or trained) before the budget check", "common/privacy/ledger.py",
             "            charge = self._charge_or_refuse(phase, mechanism, round, run_id, population_size, extra)\n"
             "            noisy = draw_noise()\n",
             "            noisy = draw_noise()\n"
             "            charge = self._charge_or_refuse(phase, mechanism, round, run_id, population_size, extra)\n",
             noise_tests("refuse")),
    # -- phase B
    Mutation("phase B noise / 10", "client/phase_b.py",
             "self.rng.normal(0.0, mechanism.noise_stddev, size=exact.shape)",
             "self.rng.normal(0.0, mechanism.noise_stddev / 10, size=exact.shape)", noise_tests("phase_b")),
    Mutation("phase B patient bound x 100", "client/phase_b.py",
             "np.minimum(bound / np.maximum(norm, 1e-12), 1.0 / np.maximum(most, 1.0))",
             "np.minimum(100 * bound / np.maximum(norm, 1e-12), 1.0 / np.maximum(most, 1.0))", noise_tests("phase_b")),
    Mutation("phase B sensitivity halved on record", "client/phase_b.py",
             "GaussianRelease(self.noise_multiplier(), self.bound(kind))",
             "GaussianRelease(self.noise_multiplier(), self.bound(kind) / 2)", noise_tests("phase_b")),
    Mutation("phase B counts sent exact", "client/phase_b.py",
             "return exact + self.rng.normal(0.0, mechanism.noise_stddev, size=exact.shape)",
             "noisy = exact + self.rng.normal(0.0, mechanism.noise_stddev, size=exact.shape)\n"
             "            noisy[:, -1] = exact[:, -1]\n            return noisy", noise_tests("phase_b")),
    Mutation("phase B per-patient bound dropped", "client/phase_b.py",
             "    return factor[cell_patient]\n", "    return np.ones(len(cell_patient))\n", noise_tests("phase_b")),
    # -- phase C
    Mutation("phase C noise / 10", "client/rl.py",
             "rng.normal(0.0, mechanism.noise_stddev, size=total.shape)",
             "rng.normal(0.0, mechanism.noise_stddev / 10, size=total.shape)", noise_tests("phase_c")),
    Mutation("phase C clip x 100", "client/rl.py",
             "min(1.0, self.config.clip / max(float(g.norm()), 1e-12))",
             "min(1.0, 100 * self.config.clip / max(float(g.norm()), 1e-12))", noise_tests("phase_c")),
    Mutation("phase C sensitivity halved on record", "client/phase_c.py",
             "DpSgd(noise_multiplier, self.config.sampling_rate, 1, self.config.clip)",
             "DpSgd(noise_multiplier, self.config.sampling_rate, 1, self.config.clip / 2)", noise_tests("phase_c")),
    Mutation("phase C per-patient bound dropped", "client/rl.py",
             "total += (g * min(1.0, self.config.clip / max(float(g.norm()), 1e-12))).numpy()",
             "total += g.numpy()", noise_tests("phase_c")),
    # -- faults: a retried secure sum, a site that hangs
    Mutation("kept release re-sent to a smaller SecAgg+ group without consent", "common/privacy/kept.py",
             "if made_for != group_text and not other_group_allowed:", "if False:  # mutated",
             (FAULT_TESTS, "-k", "refused_by_default")),
    Mutation("round-timeout ignored (waits for a hung site)", "server/phase_a.py",
             'timeout = float(run.get("round-timeout", 3600))', "timeout = None  # mutated",
             (FAULT_TESTS, "-k", "hangs")),
]


def overlay_path(root: Path, repo_path: str) -> Path:
    """Where a repository file lives in the copy laid out as the installed package."""
    top, _, rest = repo_path.partition("/")
    return root / PACKAGES[top] / rest


def build_overlay(root: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "pmlm", root / "pmlm", ignore=ignore)
    for folder in ("client", "common", "server"):
        shutil.copytree(REPO / folder, root / PACKAGES[folder], ignore=ignore)


def environment(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def check_overlay_is_imported(root: Path) -> None:
    code = "import pmlm, pmlm.client.phase_b, pmlm.common.privacy.ledger; print(pmlm.client.phase_b.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=environment(root), capture_output=True,
                          text=True, timeout=300)
    where = done.stdout.strip()
    if done.returncode or not where.startswith(str(root)):
        raise SystemExit(f"the copy is not what the tests would import ({where or done.stderr[-500:]})")


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, list[str], float, str]:
    """(passed, failed test names, seconds, output tail) of one pytest run against the copy."""
    args = [str(REPO / t) if t.startswith("tests/") else t for t in tests]
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *args],
                              cwd=root, env=environment(root), capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = f"{exc.stdout or ''}\ntimed out after {timeout:.0f} s", -1
    seconds = time.monotonic() - started
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) \S+::(\w+)", output, flags=re.M)))
    if code not in (0, 1) and not failed:
        failed = [f"(pytest exit {code})"]
    return code == 0, failed, seconds, output[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutation")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (default 900)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        parser.error(f"unknown mutation among {args.only}; --list shows them")
    if args.list:
        for m in chosen:
            print(f"{m.name:<50} {m.path:<28} {' '.join(m.tests)}")
        return 0
    for m in chosen:  # a stale mutation must not pass as "caught"
        found = (REPO / m.path).read_text().count(m.old)
        if found != 1:
            raise SystemExit(f"mutation {m.name!r}: its text occurs {found} times in {m.path}, not once; update it")

    with tempfile.TemporaryDirectory(prefix="pmlm-mutations-") as tmp:
        root = Path(tmp)
        build_overlay(root)
        check_overlay_is_imported(root)
        selections = sorted({m.tests for m in chosen})
        print(f"baseline: the unmutated copy against {len(selections)} test selections", flush=True)
        for tests in selections:
            passed, failed, seconds, output = run_tests(root, tests, args.timeout)
            if not passed:
                print(output)
                print(f"baseline fails ({' '.join(tests)}: {failed}); fix that first", file=sys.stderr)
                return 2
            print(f"  ok  {' '.join(tests)} ({seconds:.0f} s)", flush=True)

        rows = []
        for m in chosen:
            target = overlay_path(root, m.path)
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new, 1))
            try:
                passed, failed, seconds, output = run_tests(root, m.tests, args.timeout)
            finally:
                target.write_text(original)
            rows.append((m.name, failed if not passed else [], seconds))
            status = "caught by " + ", ".join(failed) if not passed else "NOT CAUGHT"
            print(f"  {m.name}: {status} ({seconds:.0f} s)", flush=True)
            if passed:
                print(output[-1500:])

    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'mutation':<{width}}  {'seconds':>7}  caught by")
    for name, failed, seconds in rows:
        print(f"{name:<{width}}  {seconds:>7.0f}  {', '.join(failed) if failed else 'NOT CAUGHT'}")
    missed = [name for name, failed, _ in rows if not failed]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
