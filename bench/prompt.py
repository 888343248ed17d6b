"""On-site prompt assembly latency without the LLM, per patient (target p50 <= 20 ms).

Assembly = her self-informed features (global model forward pass, trajectory changes), her peer facts
(nearest DP prototypes), the policy's choice and the rendering. Uses a site directory with artifacts
(default: the one `pmlm demo` leaves in out/demo/work/sites/hospital_a); without one it measures rendering
from her record alone and says so. The embedded server's generation speed is `bench/llm.py`, run after.

    python bench/prompt.py [--site DIR] [--patients N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    from pmlm.client.assemble.assembler import PromptAssembler, SiteArtifacts
    from pmlm.client.sites import SAMPLE_DATA, load_site
    from pmlm.common.profiles import load_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=REPO / "out" / "demo" / "work" / "sites" / "hospital_a")
    parser.add_argument("--data", type=Path, default=SAMPLE_DATA / "hospital_a")
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--skip-llm", action="store_true")
    args = parser.parse_args()

    profile = load_profile()
    artifacts = SiteArtifacts.load(args.site, profile) if args.site.exists() else SiteArtifacts(profile)
    for note in artifacts.missing or ([] if args.site.exists() else [f"no site directory at {args.site}"]):
        print(f"note: {note}")
    site, timelines = load_site("bench", args.data, profile, keep_timelines=True, progress=False)
    by_id = {t.patient_id: t for t in timelines}
    latest = {}
    for ex in site.examples:
        latest[ex.patient_id] = ex  # her latest prediction point, as `pmlm advise` uses
    points = list(latest.values())[: args.patients]
    assembler = PromptAssembler(artifacts)
    assembler.assemble(points[0], by_id[points[0].patient_id])  # warm-up (first forward pass)
    times = []
    for ex in points:
        started = time.perf_counter()
        assembler.assemble(ex, by_id[ex.patient_id])
        times.append((time.perf_counter() - started) * 1000)
    p50, p95 = np.percentile(times, 50), np.percentile(times, 95)
    print(f"prompt assembly without the LLM: {len(times)} patients, p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
          f"max {max(times):.1f} ms ({'meets' if p50 <= 20 else 'BELOW'} the p50 <= 20 ms target)")
    if not args.skip_llm:
        print("embedded LLM generation speed (bench/llm.py):", flush=True)
        return subprocess.call([sys.executable, str(REPO / "bench" / "llm.py")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
