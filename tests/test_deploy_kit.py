"""The deploy kit without a container engine or systemd: keys, launch scripts, unit files, compose file, app bundle.

No container engine or systemd runs on CI machines, so the compose file and units are checked by
parsing them and resolving what they point at; the launch scripts run for real against stub
`flower-*` commands that print the arguments they were given.
"""

from __future__ import annotations

import configparser
import os
import stat
import subprocess
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pmlm.cli import main as pmlm_main
from pmlm.deploy.app_bundle import QUICK_RUN_CONFIG, find_app_pyproject, write_app_bundle_dir
from pmlm.deploy.certs import make_deploy_keys

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCRIPTS = DEPLOY / "scripts"
INSTALL_ROOT = "/opt/pmlm/"  # where the units and the image put the repository


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    return out, make_deploy_keys(out, ["hospital_a", "hospital_b"], hosts=["coordinator.example.org", "10.0.0.5"])


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificates_chain_to_the_ca_with_the_right_names_and_uses(keys):
    _, paths = keys
    ca = load_cert(paths["ca"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ("superlink-cert", "hospital_a/service-cert", "hospital_a/client-cert"):
        cert = load_cert(paths[role])
        cert.verify_directly_issued_by(ca)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = load_cert(paths["superlink-cert"])
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "coordinator.example.org"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    usage = load_cert(paths["hospital_a/client-cert"]).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_private_keys_are_owner_only_and_node_keys_are_what_flower_accepts(keys):
    _, paths = keys
    for role, path in paths.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.suffix == ".key":
            assert mode == 0o600, f"{role} {oct(mode)}"
        else:
            assert not mode & 0o022, f"{role} {oct(mode)}"
    # Flower 1.42 loads the private key as OpenSSH and accepts only NIST-curve EC public keys.
    private = serialization.load_ssh_private_key(paths["hospital_a/node-auth-key"].read_bytes(), password=None)
    public = serialization.load_ssh_public_key(paths["hospital_a/node-auth-pub"].read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()


def test_deploy_certs_command(tmp_path, capsys):
    assert pmlm_main(["deploy", "certs", "--out", str(tmp_path), "--sites", "h1,h2", "--host", "link.example"]) == 0
    assert (tmp_path / "h2" / "node-auth.pub").is_file() and (tmp_path / "superlink.pem").is_file()
    assert "0600" in capsys.readouterr().out
    assert pmlm_main(["deploy", "certs", "--out", str(tmp_path / "x"), "--sites", "h1", "--site-host", "h9=a"]) == 2


def stub_bin(tmp_path: Path) -> Path:
    """flower-superlink / flower-supernode / flwr stand-ins that print their arguments, one per line."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        path = folder / name
        path.write_text('#!/usr/bin/env bash\necho "$0"; printf "%s\\n" "$@"; echo "FLWR_HOME=$FLWR_HOME"\n')
        path.chmod(0o755)
    return folder


def run_script(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{stub_bin(tmp_path)}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, env=env, timeout=30)


def example_env(tmp_path: Path, name: str, **changes: str) -> Path:
    """A deploy/config example with its paths moved under tmp_path."""
    lines = []
    for line in (DEPLOY / "config" / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            value = changes.get(key, value.replace("/var/lib/pmlm", str(tmp_path / "state")))
        lines.append(f"{key}{sep}{value}" if sep and not line.startswith("#") else line)
    path = tmp_path / name.removesuffix(".example")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_superlink_script_turns_on_tls_and_node_auth(tmp_path):
    done = run_script(tmp_path, "start-superlink.sh", str(example_env(tmp_path, "superlink.env.example")))
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    assert args[0].endswith("flower-superlink")
    for flag, value in (("--ssl-ca-certfile", "/etc/pmlm/keys/ca.pem"), ("--ssl-certfile", "/etc/pmlm/keys/superlink.pem"),
                        ("--ssl-keyfile", "/etc/pmlm/keys/superlink.key"), ("--port", "8000")):
        assert args[args.index(flag) + 1] == value
    assert "--enable-supernode-auth" in args and "--insecure" not in args
    assert "--disable-runtime-dependency-installation" in args


def test_supernode_script_points_the_node_at_its_own_data_and_site(tmp_path):
    done = run_script(tmp_path, "start-supernode.sh", str(example_env(tmp_path, "hospital.env.example")))
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    node_config = args[args.index("--node-config") + 1]
    site_dir = tmp_path / "state" / "hospital_a"
    assert node_config == f'site-id="hospital_a" data-dir="/srv/ehr-export/pmlm" site-dir="{site_dir}"'
    assert args[args.index("--root-certificates") + 1] == "/etc/pmlm/keys/ca.pem"
    assert args[args.index("--auth-supernode-private-key") + 1] == "/etc/pmlm/keys/hospital_a/node-auth.key"
    assert args[args.index("--superlink") + 1] == "coordinator.example.org:8000" and "--insecure" not in args
    assert site_dir.is_dir()


@pytest.mark.parametrize("idle, starts", [("0.25", "python"), ("3", "flower-supernode")])
def test_supernode_script_starts_the_shorter_idle_poll_unless_told_not_to(tmp_path, idle, starts):
    """With Python beside flower-supernode the script starts pmlm.deploy.supernode (the same SuperNode, shorter
    idle poll) with the same arguments; SUPERNODE_IDLE_POLL_S=3 keeps Flower's own command and timing."""
    python = stub_bin(tmp_path) / "python"
    python.write_text('#!/usr/bin/env bash\necho "$0"; printf "%s\\n" "$@"; '
                      'echo "POLL=$SUPERNODE_IDLE_POLL_S"\n')
    python.chmod(0o755)
    env = example_env(tmp_path, "hospital.env.example", SITE_WORKER="0", SUPERNODE_IDLE_POLL_S=idle)
    done = run_script(tmp_path, "start-supernode.sh", str(env))
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    assert args[0].endswith(starts)
    if starts == "python":
        assert args[1:3] == ["-m", "pmlm.deploy.supernode"] and f"POLL={idle}" in args
    assert args[args.index("--superlink") + 1] == "coordinator.example.org:8000"


@pytest.mark.parametrize("threads", ["", "3"])
def test_supernode_script_starts_the_site_worker_on_the_nodes_runtime_api_and_records(tmp_path, threads):
    """SITE_WORKER=1: the worker takes the node's tasks from its runtime API, reads the site's records ahead, and
    trains with SITE_WORKER_THREADS threads when set (all cores when empty)."""
    python = stub_bin(tmp_path) / "python"
    python.write_text('#!/usr/bin/env bash\necho "CALL $*"\n')
    python.chmod(0o755)
    env = example_env(tmp_path, "hospital.env.example", SITE_WORKER_THREADS=threads)
    done = run_script(tmp_path, "start-supernode.sh", str(env))
    assert done.returncode == 0, done.stderr
    calls = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("CALL ")]
    worker = next(c for c in calls if c[:2] == ["-m", "pmlm.client.site_worker"])
    assert any(c[:2] == ["-m", "pmlm.deploy.supernode"] for c in calls)
    for flag, value in (("--runtime-api", "127.0.0.1:9094"), ("--data-dir", "/srv/ehr-export/pmlm"),
                        ("--site-id", "hospital_a"), ("--site-dir", str(tmp_path / "state" / "hospital_a"))):
        assert worker[worker.index(flag) + 1] == value
    assert ("--threads" in worker) == bool(threads)
    if threads:
        assert worker[worker.index("--threads") + 1] == threads


def test_a_loopback_rehearsal_splits_the_cores_between_its_sites(tmp_path, monkeypatch):
    from pmlm.deploy.local import LocalDeployment

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    sites = lambda n: {f"s{i}": tmp_path for i in range(n)}  # noqa: E731
    assert [LocalDeployment(tmp_path, sites(n)).worker_threads() for n in (1, 3, 8, 10)] == [8, 2, 1, 1]


def test_scripts_refuse_missing_settings_and_spaces(tmp_path):
    bad = example_env(tmp_path, "hospital.env.example", NODE_AUTH_KEY="")
    assert run_script(tmp_path, "start-supernode.sh", str(bad)).returncode != 0
    spaced = example_env(tmp_path, "hospital.env.example", DATA_DIR='"/srv/with space"')
    assert run_script(tmp_path, "start-supernode.sh", str(spaced)).returncode == 2
    assert run_script(tmp_path, "start-superlink.sh").returncode == 2
    for script in SCRIPTS.glob("*.sh"):
        assert os.access(script, os.X_OK), script
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def repo_path(installed: str) -> Path:
    assert installed.startswith(INSTALL_ROOT), installed
    return REPO / installed.removeprefix(INSTALL_ROOT)


def test_systemd_units_parse_and_start_the_kit_s_scripts():
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} == {"pmlm-superlink.service", "pmlm-supernode@.service", "pmlm-serve@.service"}
    for unit in units:
        parser = configparser.ConfigParser(strict=True, interpolation=None)
        parser.optionxform = str  # systemd keys are case-sensitive
        parser.read_string(unit.read_text())
        assert parser.sections() == ["Unit", "Service", "Install"], unit.name
        service = parser["Service"]
        assert service["User"] == "pmlm" and service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
        program, *args = service["ExecStart"].split()
        if program.endswith(".sh"):
            assert repo_path(program).is_file() and args[0].startswith("/etc/pmlm/")
        else:
            assert program == "/opt/pmlm/.venv/bin/pmlm" and args[0] == "serve" and "--client-ca" in args
        assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_compose_file_parses_and_matches_the_kit():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"superlink", "supernode", "serve"}
    assert (REPO / services["superlink"]["build"]["context"].replace("..", ".") / "deploy" / "Dockerfile").is_file()
    for name, service in services.items():
        assert service["read_only"] is True and service["profiles"]
        assert "/etc/pmlm:/etc/pmlm:ro" in service["volumes"]
        command = service["command"]
        if command[0].endswith(".sh"):
            assert repo_path(command[0]).is_file()
    assert services["superlink"]["ports"] == ["8000:8000"]
    data_mounts = [v for v in services["supernode"]["volumes"] if "ehr-export" in v]
    assert data_mounts and all(v.endswith(":ro") for v in data_mounts)  # records are mounted read-only
    assert "--client-ca" in services["serve"]["command"]


def test_app_bundle_is_small_and_carries_only_the_app_config(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    folder = write_app_bundle_dir(tmp_path, find_app_pyproject(), {**QUICK_RUN_CONFIG, "workdir": "/x"})
    fab = build_fab_from_disk(folder)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"] and len(fab) < 10_000
    import tomllib
    config = tomllib.loads(zipfile.ZipFile(BytesIO(fab)).read("pyproject.toml").decode())
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "pmlm.server.server_app:app", "clientapp": "pmlm.client.node_app:app"}
    assert app["config"]["num-server-rounds"] == 1 and app["config"]["workdir"] == "/x"


def test_stopping_a_process_also_stops_helpers_it_detached(tmp_path):
    # Flower's SuperLink starts its SuperExec in a session of its own: a group signal misses it.
    import sys
    import time

    from pmlm.deploy.processes import ProcessSet, descendants_of

    spawner = "import subprocess, time; subprocess.Popen(['sleep', '300'], start_new_session=True); time.sleep(300)"
    processes = ProcessSet()
    try:
        started = processes.start("spawner", [sys.executable, "-c", spawner], tmp_path / "spawner.log")
        deadline = time.monotonic() + 30
        while not descendants_of(started.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        helpers = descendants_of(started.pid)
        assert helpers, "the spawner did not start its detached helper"
        processes.stop(started)
        for pid in helpers:
            stat_file = Path(f"/proc/{pid}/stat")
            assert not stat_file.exists() or stat_file.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    finally:
        processes.close()


@pytest.mark.parametrize("phases, checked", [("a", ["phase_a"]), ("abc", ["phase_a", "phase_b", "phase_c"]),
                                             (None, ["phase_a", "phase_b", "phase_c"])])
def test_a_rehearsal_checks_the_artifacts_of_the_phases_it_ran(tmp_path, monkeypatch, phases, checked):
    """`deploy local` with phases "a" (bench/deploy.py's run) must not fail on B and C artifacts it never asked for;
    a run that names no phases runs all three and checks all three."""
    from types import SimpleNamespace

    from pmlm.common.privacy.signing import public_path
    from pmlm.common.site_layout import LEDGER_PATH, SITE_KEY_PATH
    from pmlm.deploy import local

    deployment = local.LocalDeployment(tmp_path, {"site_x": tmp_path / "data"},
                                       run_config={} if phases is None else {"phases": phases})
    site_dir = deployment.site_dir("site_x")
    for path in (site_dir / LEDGER_PATH, public_path(site_dir / SITE_KEY_PATH)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    monkeypatch.setattr(local, "load_public_key", lambda path: None)
    monkeypatch.setattr(local, "verify_ledger", lambda path, key: SimpleNamespace(
        entries=[{"kind": "release", "seq": 0}], problems=[]))
    seen = []
    monkeypatch.setattr(deployment, "check_artifact", lambda site, path, phase, releases: seen.append(phase))
    log = deployment.logs / "supernode-site_x.log"
    log.parent.mkdir(parents=True)
    log.write_text("INFO : Starting Flower SuperNode\nsite worker: answering for ...\n")
    deployment.check_sites()  # the node's messages went around its worker: that is caught
    worker_check = next(c for c in deployment.checks if c.name == "site_x: site worker answered its messages")
    assert not worker_check.ok and worker_check.detail.startswith("0 messages")
    deployment.checks.clear()
    log.write_text(log.read_text() + "site worker: train answered in 0.4 s\nsite worker: query.store_model answered "
                   "in 1.0 s\n")
    deployment.check_sites()  # answered, but each through a process of its own: the task taker is not working
    assert not next(c for c in deployment.checks if c.name == worker_check.name).ok
    deployment.checks.clear()
    seen.clear()
    log.write_text(log.read_text() + "site worker: took the train task itself: its input came in 0.1 s, it was "
                   "answered in 0.9 s, its reply went in 0.0 s\n")
    deployment.check_sites()
    assert seen == checked and all(c.ok for c in deployment.checks)


def test_listening_ports_are_picked_outside_the_range_outgoing_connections_use():
    # A SuperNode once died with "address already in use": the port checked free had gone to one of Flower's
    # outgoing connections before the SuperNode bound it. Ports come from outside the kernel's ephemeral range.
    import socket

    from pmlm.deploy.local import _ephemeral_range, free_port

    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(not low <= p <= high and p >= 1024 for p in ports), (low, high, ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))  # still free to listen on


def test_the_rehearsal_lets_each_site_worker_warm_up_before_the_run_and_never_waits_forever(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pmlm.deploy import local

    lines = {"a": "site worker: read the records ahead of the first run: 9 examples in 0.1 s\n", "b": ""}
    alive = SimpleNamespace(poll=lambda: None)
    nodes = [SimpleNamespace(name=n, process=alive, log_text=lambda n=n: lines[n]) for n in lines]
    deployment = local.LocalDeployment(tmp_path, {"a": tmp_path, "b": tmp_path})
    monkeypatch.setattr(local, "WORKER_READY_TIMEOUT_S", 1.0)
    deployment.wait_workers_ready(nodes)  # neither has warmed up: it gives up after the timeout, failing nothing
    assert 1.0 <= deployment.timings["workers_ready"] < 5 and not deployment.checks
    lines["a"] += "site worker: warmed up for the first run (a throwaway DP-SGD epoch on 8 patients) in 2.0 s\n"
    lines["b"] = "site worker: reading the records ahead failed (FileNotFoundError: x); the first message reads them\n"
    monkeypatch.setattr(local, "WORKER_READY_TIMEOUT_S", 30.0)
    deployment.wait_workers_ready(nodes)
    assert deployment.timings["workers_ready"] < 1.0
