"""Bench: `pmlm serve` under concurrent AssemblePrompt and Advise calls, on loopback with mutual TLS.

Starts `pmlm serve` as its own process on a site directory with artifacts (default: the one `pmlm demo`
leaves in out/demo/work/sites/hospital_a; without one, a reduced `pmlm evaluate` builds one in a temp
directory first), with the site's LLM: the embedded llama.cpp server unless its site.json names another.
Then, at 1, 8 and 32 concurrent clients (each its own TLS channel; 32 twice, to see whether memory keeps
growing), every client runs rounds of three AssemblePrompt calls and one Advise call, each for a different
patient, until the level's requests are done or its time cap is reached (requests not started by then are
counted, not sent).

Prints per level and per RPC: calls, errors (by status), p50/p99/max latency (Advise: until the stream
ends; also its first event, the prompt), and the RSS of the serve process and of its LLM server at start
and after each level. On shared cores the latencies are noisy: the load average is printed with them.

    python bench/serve.py [--site DIR | --build] [--levels 1,8,32,32] [--rounds-total 16] [--level-cap-s 300]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITE = REPO / "out" / "demo" / "work" / "sites" / "hospital_a"
ASSEMBLES_PER_ROUND = 3
DEADLINE_S = 600.0  # per call: far above any wait here, so a slow answer is measured, not cut off
QUESTION = "What care does she need in the coming weeks?"


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        return kb / 1024
    except (OSError, StopIteration):
        return None


def child_pids(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def build_site(workdir: Path) -> Path:
    """A reduced `pmlm evaluate` on 40 women per sample hospital leaves site directories with every artifact."""
    import gzip

    from pmlm.client.ingest import RecordReader
    from pmlm.client.ingest.csv_events import write_csv_timelines
    from pmlm.client.sites import SAMPLE_DATA

    data = workdir / "data"
    for site in ("hospital_a", "hospital_b", "hospital_c"):
        (data / site).mkdir(parents=True)
        with gzip.open(data / site / "events.csv.gz", "wt", newline="") as f:
            write_csv_timelines(itertools.islice(RecordReader(SAMPLE_DATA / site), 40), f)
    print(f"building a site directory: reduced pmlm evaluate in {workdir} (a few minutes)", flush=True)
    done = subprocess.run([sys.executable, "-m", "pmlm", "evaluate", "--data", str(data), "--workdir",
                           str(workdir / "work"), "--json-out", str(workdir / "evaluate.json"), "--max-test-points", "4",
                           "--rounds", "1", "--phase-c-rounds", "1", "--phase-c-rate", "0.05", "--no-trained-baselines"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pmlm evaluate failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return workdir / "work" / "sites" / "hospital_a"


def patients_with_points(site_dir: Path) -> list[str]:
    from pmlm.client.examples import build_examples
    from pmlm.client.ingest import RecordReader
    from pmlm.client.site_config import SiteConfig
    from pmlm.common.profiles import load_profile

    config = SiteConfig.load(site_dir)
    profile = load_profile(config.profile)
    return [t.patient_id for t in RecordReader(Path(config.data_dir)) if build_examples(t, profile)]


class Server:
    """`pmlm serve` as a child process, stopped by its PID."""

    def __init__(self, site_dir: Path, keys: dict[str, Path], site_id: str, workers: int | None):
        command = [sys.executable, "-m", "pmlm", "serve", "--site", str(site_dir), "--address", "127.0.0.1:0",
                   "--cert", str(keys[f"{site_id}/service-cert"]), "--key", str(keys[f"{site_id}/service-key"]),
                   "--client-ca", str(keys["ca"])]
        if workers:
            command += ["--workers", str(workers)]
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            match = re.search(r" on [\d.]+:(\d+) ", line or "")
            if match:
                self.port = int(match.group(1))
                return
            if line is None or self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("pmlm serve did not start:\n" + "\n".join(self.log[-20:]))

    def _drain(self, lines: queue.Queue) -> None:
        for line in self.process.stdout:
            self.log.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    def memory(self) -> tuple[float | None, float | None]:
        """(RSS of pmlm serve, RSS of its children: the embedded LLM server) in MB."""
        children = [rss_mb(pid) or 0.0 for pid in child_pids(self.process.pid)]
        return rss_mb(self.process.pid), (sum(children) if children else None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # pmlm serve stops its LLM server on SIGTERM
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def channel(port: int, keys: dict[str, Path], site_id: str):
    import grpc

    credentials = grpc.ssl_channel_credentials(keys["ca"].read_bytes(),
                                               private_key=keys[f"{site_id}/client-key"].read_bytes(),
                                               certificate_chain=keys[f"{site_id}/client-cert"].read_bytes())
    return grpc.secure_channel(f"localhost:{port}", credentials)


def call(stub, rpc: str, patient: str) -> dict:
    """One call; its latency, Advise's time to the first event, and the status when it failed."""
    import grpc

    from pmlm.v1 import prompt_service_pb2 as prompt_pb

    started = time.perf_counter()
    first = None
    try:
        if rpc == "AssemblePrompt":
            stub.AssemblePrompt(prompt_pb.AssemblePromptRequest(patient_id=patient, question=QUESTION),
                                timeout=DEADLINE_S)
        else:
            kinds = []
            for event in stub.Advise(prompt_pb.AdviseRequest(patient_id=patient, question=QUESTION),
                                     timeout=DEADLINE_S):
                first = first if first is not None else time.perf_counter() - started
                kinds.append(event.WhichOneof("event"))
            if not kinds or kinds[0] != "prompt" or kinds[-1] != "done":
                return {"rpc": rpc, "s": time.perf_counter() - started, "error": f"incomplete stream {kinds[:3]}"}
        return {"rpc": rpc, "s": time.perf_counter() - started, "first_s": first, "error": None}
    except grpc.RpcError as exc:
        return {"rpc": rpc, "s": time.perf_counter() - started, "error": f"{exc.code().name}: {exc.details()}"}


def run_level(port: int, keys, site_id: str, patients: list[str], clients: int, rounds: int, cap_s: float) -> dict:
    from pmlm.v1 import prompt_service_pb2_grpc as prompt_grpc

    jobs: queue.Queue = queue.Queue()
    patient = itertools.cycle(patients)
    for _ in range(rounds * clients):
        for rpc in ["AssemblePrompt"] * ASSEMBLES_PER_ROUND + ["Advise"]:
            jobs.put((rpc, next(patient)))
    planned = jobs.qsize()
    results: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + cap_s

    def client() -> None:
        with channel(port, keys, site_id) as ch:
            stub = prompt_grpc.PromptServiceStub(ch)
            while time.monotonic() < stop_at:
                try:
                    rpc, pid = jobs.get_nowait()
                except queue.Empty:
                    return
                outcome = call(stub, rpc, pid)
                with lock:
                    results.append(outcome)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "planned": planned, "not_sent": planned - len(results),
            "wall_s": time.monotonic() - started, "results": results}


def summarise(level: dict) -> list[dict]:
    rows = []
    for rpc in ("AssemblePrompt", "Advise"):
        calls = [r for r in level["results"] if r["rpc"] == rpc]
        ok = [r for r in calls if r["error"] is None]
        seconds = np.array([r["s"] for r in ok]) if ok else np.array([np.nan])
        firsts = np.array([r["first_s"] for r in ok if r.get("first_s") is not None] or [np.nan])
        rows.append({"clients": level["clients"], "rpc": rpc, "calls": len(calls), "errors": len(calls) - len(ok),
                     "error_rate": (len(calls) - len(ok)) / max(len(calls), 1),
                     "p50_s": float(np.percentile(seconds, 50)), "p99_s": float(np.percentile(seconds, 99)),
                     "max_s": float(np.max(seconds)), "first_event_p50_s": float(np.percentile(firsts, 50)),
                     "by_status": dict(Counter(r["error"].split(":")[0] for r in calls if r["error"])),
                     "first_errors": [r["error"] for r in calls if r["error"]][:3]})
    return rows


def warm_up(port: int, keys, site_id: str, patient: str) -> None:
    """First calls load the records and artifacts and start the LLM server: not part of any level."""
    from pmlm.v1 import prompt_service_pb2_grpc as prompt_grpc

    with channel(port, keys, site_id) as ch:
        stub = prompt_grpc.PromptServiceStub(ch)
        for rpc in ("AssemblePrompt", "Advise"):
            outcome = call(stub, rpc, patient)
            if outcome["error"]:
                raise RuntimeError(f"warm-up {rpc} failed: {outcome['error']}")
            print(f"warm-up {rpc}: {outcome['s']:.1f} s", flush=True)


def main() -> int:
    from pmlm.client.site_config import SiteConfig
    from pmlm.deploy.certs import make_deploy_keys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=None, help=f"site directory (default {DEFAULT_SITE}, else built)")
    parser.add_argument("--build", action="store_true", help="build a fresh site directory even if the demo's exists")
    parser.add_argument("--levels", default="1,8,32,32",
                        help="concurrent clients per level (default 1,8,32,32: the last one again, to see whether "
                             "memory keeps growing)")
    parser.add_argument("--rounds-total", type=int, default=16,
                        help="rounds (3 AssemblePrompt + 1 Advise) per level, split over its clients; at least one "
                             "per client (default 16)")
    parser.add_argument("--level-cap-s", type=float, default=300.0, help="no new request after this (default 300)")
    parser.add_argument("--workers", type=int, default=None, help="pmlm serve --workers (default: its own)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pmlm-bench-serve-") as tmp:
        tmp = Path(tmp)
        if args.site is None and (args.build or not (DEFAULT_SITE / "site.json").exists()):
            args.site = build_site(tmp)
        site_dir = args.site or DEFAULT_SITE
        site_id = SiteConfig.load(site_dir).site_id
        keys = make_deploy_keys(tmp / "keys", [site_id])
        patients = patients_with_points(site_dir)
        print(f"site {site_id} at {site_dir}: {len(patients)} patients with a prediction point", flush=True)
        server = Server(site_dir, keys, site_id, args.workers)
        memory = [("started", *server.memory())]
        try:
            warm_up(server.port, keys, site_id, patients[0])
            memory.append(("after warm-up", *server.memory()))
            rows = []
            for clients in (int(c) for c in args.levels.split(",")):
                rounds = max(1, args.rounds_total // clients)
                load = os.getloadavg()[0]
                level = run_level(server.port, keys, site_id, patients, clients, rounds, args.level_cap_s)
                memory.append((f"after {clients} clients", *server.memory()))
                for row in summarise(level):
                    rows.append({**row, "not_sent": level["not_sent"], "wall_s": level["wall_s"], "load": load})
                print(f"level {clients}: {len(level['results'])} calls in {level['wall_s']:.0f} s "
                      f"({level['not_sent']} not sent before the cap)", flush=True)
        finally:
            server.stop()
    print(f"\npmlm serve on loopback (mutual TLS), site {site_id}; {ASSEMBLES_PER_ROUND} AssemblePrompt + 1 Advise "
          f"per round; {os.cpu_count()} CPUs, load average at each level's start shown (shared cores: noisy)")
    print(f"{'clients':>7} {'rpc':<15} {'calls':>5} {'errors':>6} {'p50 s':>7} {'p99 s':>7} {'max s':>7} "
          f"{'1st event p50':>13} {'not sent':>8} {'load':>5}   (not sent: of the whole level, at its time cap)")
    for r in rows:
        first = f"{r['first_event_p50_s']:.2f}" if r["rpc"] == "Advise" else "-"
        print(f"{r['clients']:>7} {r['rpc']:<15} {r['calls']:>5} {r['error_rate']:>6.1%} {r['p50_s']:>7.2f} "
              f"{r['p99_s']:>7.2f} {r['max_s']:>7.2f} {first:>13} {r['not_sent']:>8} "
              f"{r['load']:>5.1f}")
        for error in r["first_errors"]:
            print(f"{'':>7} error: {error[:160]}")
    print(f"\n{'RSS (MB)':<22} {'pmlm serve':>10} {'LLM server':>10}")
    for label, serve_mb, llm_mb in memory:
        print(f"{label:<22} {serve_mb or 0:>10.0f} {('-' if llm_mb is None else f'{llm_mb:.0f}'):>10}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "memory": memory}, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
