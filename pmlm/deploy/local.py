"""`pmlm deploy local`: a real consortium on loopback, the way the runbook sets one up on real hosts.

One SuperLink and N SuperNodes, started with deploy/scripts/ from env files like the ones in
deploy/config/; with TLS (the default) the SuperLink admits only registered SuperNodes, and two
refusals are checked: a plain-text connection and a SuperNode whose key was never registered.
Then the PMLM app runs with `flwr run` through all its phases, and every site's artifacts and
privacy ledger are checked. Every process started here is stopped by its PID, also on failure.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmlm.client.ingest import list_record_files
from pmlm.common.atomic import write_atomic
from pmlm.common.privacy.ledger import verify_ledger
from pmlm.common.privacy.signing import load_public_key, public_path
from pmlm.common.site_layout import LEDGER_PATH, SITE_KEY_PATH, current_manifest
from pmlm.deploy.app_bundle import find_app_pyproject, write_app_bundle_dir
from pmlm.deploy.certs import make_deploy_keys, make_node_auth_key
from pmlm.deploy.processes import ProcessSet, Started, wait_for

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
SCRIPTS = DEPLOY_DIR / "scripts"
CONNECTION = "pmlm"  # the [superlink.NAME] entry the operator's Flower CLI uses
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
QUICK_PATIENTS = 40  # records per site in a --quick run: enough for train/val/test splits
CLI_TIMEOUT_S = 120
# Bounded waits for processes to come up or a run to end; generous because CI machines can be loaded.
STARTUP_TIMEOUT_S = 180
# Lines of the run log worth showing while it runs: phase A's rounds and the later phases' own markers.
PROGRESS_LINE = re.compile(r"\[ROUND \d+/\d+\]|\[PMLM phase|Strategy execution finished")
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# What a site must hold after each phase (relative to its site dir); later phases add their manifests.
PHASE_ARTIFACTS = {phase: current_manifest(phase) for phase in ("phase_a", "phase_b", "phase_c")}
UNREGISTERED = "unregistered"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


WORKER_ANSWERED = re.compile(r"^site worker: \S+ answered in ", re.MULTILINE)
# client/site_worker.py read_ahead: done reading and warming up, or given up on either
WORKER_READY = re.compile(r"^site worker: (warmed up for the first run|warming up failed|reading the records ahead "
                          r"failed)", re.MULTILINE)
WORKER_READY_TIMEOUT_S = 120.0
WORKER_TOOK = re.compile(r"^site worker: took the \S+ task itself", re.MULTILINE)  # client/task_taker.py


@dataclass
class LocalDeployment:
    run_dir: Path
    sites: dict[str, Path]  # site id -> data dir
    tls: bool = True
    run_config: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 900.0
    app_pyproject: Path | None = None
    site_worker: bool = True  # start-supernode.sh's SITE_WORKER: a long-lived worker answers each node's messages
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    progress: list[tuple[float, str]] = field(default_factory=list)  # (seconds into the app run, progress line)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir).resolve()
        self.processes = ProcessSet()
        self.keys_dir = self.run_dir / "keys"
        self.cli_home = self.run_dir / "operator" / "flwr-home"
        self.logs = self.run_dir / "logs"
        self.link_port = free_port()

    # -- small helpers ------------------------------------------------------------------------

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        print(f"  [{'ok' if ok else 'FAILED'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def env(self, **extra: str) -> dict[str, str]:
        # The launch scripts call flower-superlink/flower-supernode by name: find the ones installed beside
        # this Python even when its environment is not activated (CI runs .venv/bin/python directly).
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **FLOWER_ENV, "PATH": path, **extra}

    def flwr(self, *args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        """One call of the operator's Flower CLI against this deployment's SuperLink."""
        return subprocess.run([_tool("flwr"), *args], capture_output=True, text=True, timeout=timeout_s,
                              env=self.env(FLWR_HOME=str(self.cli_home)), stdin=subprocess.DEVNULL)

    def flwr_json(self, *args: str, timeout_s: float = CLI_TIMEOUT_S) -> dict[str, Any]:
        done = self.flwr(*args, "--format", "json", timeout_s=timeout_s)
        try:
            result = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            result = {"success": False, "error-message": (done.stdout + done.stderr)[-2000:]}
        return result

    def timed(self, name: str, since: float) -> None:
        self.timings[name] = round(time.monotonic() - since, 1)

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> bool:
        started = time.monotonic()
        try:
            self.prepare()
            self.start_superlink()
            if self.tls:
                self.check_plaintext_refused()
                self.register_sites()
            nodes = [self.start_supernode(site) for site in self.sites]
            rogue = self.start_unregistered_supernode() if self.tls else None
            self.wait_nodes_online(nodes)
            if self.site_worker:
                self.wait_workers_ready(nodes)
            if rogue is not None:
                self.check_unregistered_refused(rogue)
            if self.all_ok():
                self.run_app()
                self.check_sites()
        except (TimeoutError, subprocess.TimeoutExpired, OSError, RuntimeError) as exc:
            self.check("deployment ran to the end", False, f"{type(exc).__name__}: {exc}")
        finally:
            stop_started = time.monotonic()
            self.pids = {started.name: started.pid for started in self.processes.started}
            self.processes.close()
            self.timed("stop", stop_started)
            self.timed("total", started)
            self.write_report()
        return self.all_ok()

    def all_ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def prepare(self) -> None:
        t = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cli_home.mkdir(parents=True, exist_ok=True)
        connection = [f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]',
                      f'address = "127.0.0.1:{self.link_port}"']
        if self.tls:
            make_deploy_keys(self.keys_dir, list(self.sites))
            make_node_auth_key(self.keys_dir / UNREGISTERED, "pmlm-never-registered")
            connection.append(f'root-certificates = "{self.keys_dir / "ca.pem"}"')
        else:
            connection.append("insecure = true")
        write_atomic(self.cli_home / "config.toml", "\n".join(connection) + "\n")
        self.timed("prepare", t)

    def start_superlink(self) -> None:
        t = time.monotonic()
        folder = self.run_dir / "superlink"
        env_file = write_env_file(folder / "superlink.env", {
            "SUPERLINK_HOST": "127.0.0.1", "SUPERLINK_PORT": self.link_port,
            "SUPERLINK_DATABASE": folder / "state.db", "FLWR_HOME": folder / "flwr-home",
            "PMLM_TLS": int(self.tls), "CA_CERT": self.keys_dir / "ca.pem",
            "SUPERLINK_CERT": self.keys_dir / "superlink.pem", "SUPERLINK_KEY": self.keys_dir / "superlink.key"})
        self.superlink = self.processes.start("superlink", ["bash", str(SCRIPTS / "start-superlink.sh"),
                                                            str(env_file)], self.logs / "superlink.log",
                                              env=self.env())
        wait_for(lambda: _alive(self.superlink) and port_open(self.link_port), STARTUP_TIMEOUT_S,
                 what=f"the SuperLink on 127.0.0.1:{self.link_port}")
        self.timed("superlink_up", t)

    def check_plaintext_refused(self) -> None:
        # A hang-up is a refusal only from a SuperLink that answers the same request over TLS: a dead or wedged
        # port hangs up too.
        reply = plaintext_probe(self.link_port)
        over_tls = plaintext_probe(self.link_port, ca_file=self.keys_dir / "ca.pem")
        self.check("plain-text connection to the TLS SuperLink refused",
                   not reply.startswith(b"HTTP/") and over_tls.startswith(b"HTTP/"),
                   f"answer to a plain HTTP request: {reply[:40]!r}; to the same request over TLS: {over_tls[:40]!r}")

    def register_sites(self) -> None:
        t = time.monotonic()
        for site in self.sites:
            done = subprocess.run(["bash", str(SCRIPTS / "register-supernode.sh"), site,
                                   str(self.keys_dir / site / "node-auth.pub"), CONNECTION],
                                  capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                                  env=self.env(FLWR_HOME=str(self.cli_home)), stdin=subprocess.DEVNULL)
            ok = done.returncode == 0 and '"success": true' in done.stdout
            self.check(f"{site}: node key registered", ok, "" if ok else (done.stdout + done.stderr)[-500:])
            if not ok:
                raise RuntimeError(f"could not register {site}")
        self.timed("register", t)

    def worker_threads(self) -> int:
        """Every site runs on this one host: each worker trains with its share of the cores (site_worker.py)."""
        return max(1, (os.cpu_count() or 1) // max(1, len(self.sites)))

    def site_dir(self, site: str) -> Path:
        return self.run_dir / "sites" / site

    def start_supernode(self, site: str, *, data_dir: Path | None = None, auth_key: Path | None = None,
                        max_retries: str = "") -> Started:
        site_dir = self.site_dir(site)
        env_file = write_env_file(self.run_dir / "config" / f"{site}.env", {
            "SITE_ID": site, "DATA_DIR": data_dir or self.sites[site], "SITE_DIR": site_dir,
            "SUPERLINK_ADDRESS": f"127.0.0.1:{self.link_port}", "SUPERNODE_PORT": free_port(),
            "PMLM_TLS": int(self.tls), "CA_CERT": self.keys_dir / "ca.pem",
            "NODE_AUTH_KEY": auth_key or self.keys_dir / site / "node-auth.key",
            "FLWR_HOME": site_dir / "flwr-home", "SUPERNODE_MAX_RETRIES": max_retries,
            "SUPERNODE_MAX_WAIT_S": "30" if max_retries else "", "SITE_WORKER": int(self.site_worker),
            "SITE_WORKER_THREADS": self.worker_threads()})
        return self.processes.start(f"supernode {site}", ["bash", str(SCRIPTS / "start-supernode.sh"),
                                                          str(env_file)], self.logs / f"supernode-{site}.log",
                                    env=self.env())

    def start_unregistered_supernode(self) -> Started:
        """A SuperNode with a valid TLS setup whose key the coordinator never registered."""
        some_data = next(iter(self.sites.values()))
        return self.start_supernode(UNREGISTERED, data_dir=some_data, max_retries="1",
                                    auth_key=self.keys_dir / UNREGISTERED / "node-auth.key")

    def wait_nodes_online(self, nodes: list[Started]) -> None:
        t = time.monotonic()
        wait_for(lambda: all("SuperNode ID" in n.log_text() or not _alive(n) for n in nodes), STARTUP_TIMEOUT_S, 0.5,
                 what="the SuperNodes to connect")
        dead = [n.name for n in nodes if not _alive(n)]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited; see {self.logs}")
        online: set[str] = set()

        def all_online() -> bool:
            listing = self.flwr_json("supernode", "ls", CONNECTION)
            online.clear()
            online.update(n["node-id"] for n in listing.get("nodes", []) if n.get("status") == "online")
            return len(online) >= len(nodes)
        wait_for(all_online, STARTUP_TIMEOUT_S, 2.0, what=f"{len(nodes)} SuperNodes online at the SuperLink")
        self.check(f"{len(nodes)} SuperNodes online", True, ", ".join(sorted(online)))
        self.timed("supernodes_online", t)

    def wait_workers_ready(self, nodes: list[Started]) -> None:
        """Let each site worker read its records and warm up before the run starts, as a hospital's worker has long
        before a consortium's run (client/site_worker.py); a worker that is slow or failed only loses its head
        start, so this waits at most WORKER_READY_TIMEOUT_S and checks nothing."""
        t = time.monotonic()
        try:
            wait_for(lambda: all(WORKER_READY.search(n.log_text()) or not _alive(n) for n in nodes),
                     WORKER_READY_TIMEOUT_S, 0.5, what="the site workers to warm up")
        except TimeoutError:
            print(f"  (site workers not all warmed up after {WORKER_READY_TIMEOUT_S:.0f} s: starting the run anyway)",
                  flush=True)
        self.timed("workers_ready", t)

    def check_unregistered_refused(self, rogue: Started) -> None:
        t = time.monotonic()
        try:
            rogue.process.wait(90)
        except subprocess.TimeoutExpired:
            pass
        refused_by_link = "No SuperNode found with the given public key" in self.superlink.log_text()
        exited = rogue.process.poll()
        self.check("unregistered SuperNode refused", exited not in (None, 0) and refused_by_link,
                   f"exit code {exited}; SuperLink logged the unknown key: {refused_by_link}")
        self.timed("unregistered_refused", t)

    def run_app(self) -> None:
        t = self.app_started = time.monotonic()
        config = {"workdir": str(self.run_dir / "coordinator"), **self.run_config}
        app_dir = write_app_bundle_dir(self.run_dir / "app", self.app_pyproject or find_app_pyproject(), config)
        started = self.flwr_json("run", str(app_dir), CONNECTION)
        if not self.check("flwr run accepted the app", bool(started.get("success")),
                          str(started.get("run-id") or started.get("error-message", ""))[-500:]):
            return
        run_id = str(started["run-id"])
        # `flwr log` streams until the run ends; its own timeout bounds a run that hangs.
        log = self.logs / f"run-{run_id}.log"
        try:
            self.stream_run_log(run_id, log)
        except subprocess.TimeoutExpired:
            self.flwr("stop", run_id, CONNECTION)
            raise
        status = ""

        def finished() -> bool:
            nonlocal status
            runs = self.flwr_json("ls", CONNECTION, "--run-id", run_id).get("runs", [{}])
            status = runs[0].get("status", "") if runs else ""
            return status.startswith("finished")
        wait_for(finished, STARTUP_TIMEOUT_S, 2.0, what=f"run {run_id} to finish")
        self.check("app run completed", status == "finished:completed", f"run {run_id}: {status}; log {log}")
        self.timed("app_run", t)

    def stream_run_log(self, run_id: str, log: Path) -> None:
        """Keep the whole run log in a file and show its progress lines (rounds, phases) as they come."""
        deadline = time.monotonic() + self.timeout_s
        with open(log, "w") as out, subprocess.Popen(
                [_tool("flwr"), "log", run_id, CONNECTION, "--stream"], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
                env=self.env(FLWR_HOME=str(self.cli_home))) as streaming:
            watchdog = threading.Timer(self.timeout_s, streaming.kill)  # a run that hangs must not hang us
            watchdog.start()
            try:
                for line in streaming.stdout:
                    out.write(line)
                    if PROGRESS_LINE.search(line):
                        text = ANSI_COLOUR.sub('', line).split(':', 1)[-1].strip()
                        self.progress.append((round(time.monotonic() - self.app_started, 1), text))
                        print(f"    {text}", flush=True)
            finally:
                watchdog.cancel()
        if time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(["flwr", "log", run_id], self.timeout_s)

    def check_sites(self) -> None:
        # dp-accounting warns for every RDP order it skips while re-pricing; the result is valid.
        logging.getLogger("absl").setLevel(logging.ERROR)
        for site in self.sites:
            site_dir = self.site_dir(site)
            ledger_path = site_dir / LEDGER_PATH
            if not self.check(f"{site}: privacy ledger present", ledger_path.is_file(), str(ledger_path)):
                continue
            # The site's own key file is the trust anchor here; an auditor would use a key filed earlier.
            key_file = public_path(site_dir / SITE_KEY_PATH)
            if not self.check(f"{site}: site signing key present", key_file.is_file(), str(key_file)):
                continue
            replay = verify_ledger(ledger_path, load_public_key(key_file))
            releases = [e for e in replay.entries if e.get("kind") == "release"]
            self.check(f"{site}: ledger verifies", not replay.problems and bool(releases),
                       f"{len(releases)} releases" + (f"; {replay.problems[0]}" if replay.problems else ""))
            if self.site_worker:  # the node's messages went to its worker (client/site_worker.py), not around it,
                # and it took tasks from the SuperNode itself (client/task_taker.py) instead of a process each
                log = self.logs / f"supernode-{site}.log"
                text = log.read_text(errors="replace") if log.is_file() else ""
                answered, took = len(WORKER_ANSWERED.findall(text)), len(WORKER_TOOK.findall(text))
                self.check(f"{site}: site worker answered its messages", answered > 0 and took > 0,
                           f"{answered} messages, {took} of them taken from the SuperNode without a process")
            ran = str(self.run_config.get("phases", "abc"))  # a run of phase A alone leaves no B or C artifact
            for phase, artifact in PHASE_ARTIFACTS.items():
                if phase.removeprefix("phase_") in ran:
                    self.check_artifact(site, site_dir / artifact, phase, {e["seq"]: e for e in releases})

    def check_artifact(self, site: str, manifest_path: Path, phase: str, releases: dict[int, dict]) -> None:
        if not self.check(f"{site}: {phase} artifact present", manifest_path.is_file(), str(manifest_path)):
            return
        manifest = json.loads(manifest_path.read_text())
        folder = manifest_path.parents[1] / manifest.get("path", "")
        release = manifest.get("ledger_release", {})
        entry = releases.get(release.get("seq"))
        tied = entry is not None and entry.get("signature") == release.get("signature")
        self.check(f"{site}: {phase} artifact tied to its ledger release", folder.is_dir() and tied,
                   f"{manifest.get('path')} <- ledger seq {release.get('seq')}")

    def write_report(self) -> None:
        report = {"ok": self.all_ok(), "tls": self.tls, "sites": {s: str(p) for s, p in self.sites.items()},
                  "run_config": self.run_config, "timings_s": self.timings,
                  "progress_s": self.progress,
                  "checks": [vars(c) for c in self.checks], "run_dir": str(self.run_dir),
                  "stopped_pids": getattr(self, "pids", {})}
        write_atomic(self.run_dir / "deploy_report.json", json.dumps(report, indent=2))


# -- helpers without state ---------------------------------------------------------------------

def _tool(name: str) -> str:
    """A console script of this environment (flwr, flower-*), found next to the running Python."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _alive(started: Started) -> bool:
    return started.process.poll() is None


def write_env_file(path: Path, values: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, value in values.items():
        text = str(value)
        if any(ch in text for ch in "\"'$`\\\n "):
            raise ValueError(f"{key}={text!r}: paths and values may not hold spaces, quotes or shell characters")
        lines.append(f"{key}={text}")
    write_atomic(path, "\n".join(lines) + "\n")
    return path


_HANDED_OUT: set[int] = set()  # never the same port twice from one process, even once it is free again


def free_port() -> int:
    """A loopback port to listen on, picked below the kernel's ephemeral range.

    A port the kernel hands out for bind(0) comes from the range it also uses for outgoing connections, and
    Flower opens many (each SuperNode polls over fresh HTTP connections): between our check and the SuperNode's
    own bind, one of them took the port once and the SuperNode died with "address already in use".
    """
    low, high = _ephemeral_range()
    # Below the range where there is room (Linux: 20768-32767), else above it.
    span = (max(1024, low - 12000), low) if low - 1024 >= 2000 else (high + 1, 65536)
    for _ in range(200):
        port = random.randrange(*span)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {span[0]}-{span[1] - 1}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def plaintext_probe(port: int, timeout_s: float = 5.0, ca_file: Path | None = None) -> bytes:
    """Send an HTTP request to the port and return whatever comes back (b"" if the peer hangs up or cannot be
    reached); in plain text, or over TLS verified with `ca_file`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as raw:
            s = raw if ca_file is None else ssl.create_default_context(cafile=str(ca_file)).wrap_socket(
                raw, server_hostname="127.0.0.1")
            s.sendall(b"POST /v1/fleet/activate-node HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
            return s.recv(256)
    except (OSError, socket.timeout, ssl.SSLError):  # reset, refused, handshake failed: no answer
        return b""


def quick_slice(sites: dict[str, Path], out: Path, patients: int = QUICK_PATIENTS) -> dict[str, Path]:
    """The first `patients` patients of each site, so a rehearsal trains in seconds.

    Event tables (csv/csv.gz, grouped by patient as pmlm writes them) keep the rows of their first
    patients; FHIR files are copied whole, one patient per file, until the count is reached.
    """
    sliced = {}
    for site, data_dir in sites.items():
        target = out / site
        target.mkdir(parents=True, exist_ok=True)
        kept: set[str] = set()
        for path in list_record_files(data_dir):
            if len(kept) >= patients:
                break
            name = path.name.lower()
            if name.endswith((".csv", ".csv.gz")):
                _slice_csv(path, target / path.name, kept, patients)
            else:
                shutil.copy2(path, target / path.name)
                kept.add(path.name)
        sliced[site] = target
    return sliced


def _slice_csv(source: Path, target: Path, kept: set[str], patients: int) -> None:
    opener = gzip.open if source.name.lower().endswith(".gz") else open
    with opener(source, "rt", newline="") as f, opener(target, "wt", newline="") as out:
        reader, writer = csv.reader(f), csv.writer(out)
        header = next(reader)
        writer.writerow(header)
        column = header.index("patient_id")
        for row in reader:
            pid = row[column]
            if pid not in kept:
                if len(kept) >= patients:
                    break  # pmlm writes event tables grouped by patient: the rest are other patients
                kept.add(pid)
            writer.writerow(row)
