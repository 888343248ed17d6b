"""Ingestion throughput and memory: bundles/s and peak RSS for 50 and 200 Synthea bundles.

Targets (issue 2): >= 20 bundles/s per core; peak RSS for 200 within 20% of that for 50 (streaming).
Each size runs in a fresh process so peak RSS is its own. Bundles: --bundles DIR, or real generator
output replicated under new patient ids (generated once into .cache/bench-bundles).

    python bench/ingest.py [--bundles DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(source: Path | None, n: int, out: Path) -> Path:
    if source is None:
        source = REPO / ".cache" / "bench-bundles" / "fhir"
        if not source.exists():
            exe = shutil.which("synthea") or str(Path(sys.executable).with_name("synthea"))
            subprocess.run([exe, "-p", "10", "-s", "77", "-g", "f", "-a", "18-40", "-r", "20260301",
                            "--state", "Massachusetts", "-o", str(source.parent)], check=True, capture_output=True)
    originals = sorted(source.glob("*.json"))
    folder = out / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = originals[i % len(originals)].read_text()
        bundle = json.loads(text)
        for entry in bundle["entry"]:
            if entry["resource"]["resourceType"] == "Patient":
                old = entry["resource"]["id"]
        (folder / f"b{i:04d}.json").write_text(text.replace(old, f"{old[:-6]}{i:06d}"))
    return folder


def measure(folder: Path) -> dict:
    code = (
        "import resource, sys, time\n"
        "from pmlm.client.ingest import RecordReader\n"
        "t = time.perf_counter(); c = time.process_time(); r = RecordReader(sys.argv[1]); n = 0; ev = 0\n"
        "for tl in r: n += 1; ev += len(tl.events)\n"
        "dt = time.perf_counter() - t; dc = time.process_time() - c\n"
        "print(n, ev, dt, dc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(r.quarantined))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True, text=True)
    n, events, seconds, cpu_seconds, rss_kb, quarantined = out.stdout.split()
    return {"bundles": int(n), "events": int(events), "seconds": float(seconds), "cpu_seconds": float(cpu_seconds),
            "bundles_per_s": int(n) / float(seconds), "bundles_per_cpu_s": int(n) / float(cpu_seconds),
            "peak_rss_mb": int(rss_kb) / 1024,
            "quarantined": int(quarantined)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, help="a folder of Synthea bundles to replicate")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-ingest")
    args = parser.parse_args()
    results = {}
    for n in (50, 200):
        folder = prepare(args.bundles, n, args.work)
        size_mb = sum(p.stat().st_size for p in folder.glob("*.json")) / 2**20
        results[n] = measure(folder) | {"input_mb": size_mb}
    print(f"{'bundles':>8} {'input MB':>9} {'events':>9} {'wall s':>7} {'bundles/s':>10} {'CPU s':>7} "
          f"{'bundles/CPU-s':>14} {'peak RSS MB':>12}")
    for n, r in results.items():
        print(f"{n:>8} {r['input_mb']:>9.0f} {r['events']:>9} {r['seconds']:>7.2f} {r['bundles_per_s']:>10.1f} "
              f"{r['cpu_seconds']:>7.2f} {r['bundles_per_cpu_s']:>14.1f} {r['peak_rss_mb']:>12.1f}")
    ratio = results[200]["peak_rss_mb"] / results[50]["peak_rss_mb"]
    print(f"peak RSS 200/50: {ratio:.2f} (target <= 1.20)")
    print("one process on one core: bundles per CPU-second is the per-core rate (target >= 20); wall-clock "
          "bundles/s drops when other work shares the cores")


if __name__ == "__main__":
    main()
