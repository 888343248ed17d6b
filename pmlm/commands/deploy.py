"""`pmlm deploy`: key material, the app bundle, and a full loopback rehearsal of a real deployment.

  pmlm deploy certs --out DIR --sites hospital_a,hospital_b [--host coordinator.example.org]
  pmlm deploy app --out DIR [--quick] [--run-config KEY=VALUE ...]
  pmlm deploy local --sites N [--no-tls] [--no-site-worker] [--quick] [--data DIR] [--workdir DIR]

The README's runbook shows how these fit with deploy/scripts, deploy/config, deploy/systemd and
deploy/docker-compose.yml on real hosts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pmlm import logs
from pmlm.cli import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    deploy = subparsers.add_parser("deploy", help="certificates, app bundle, loopback deployment rehearsal",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = deploy.add_subparsers(dest="deploy_command", metavar="SUBCOMMAND", required=True)

    certs = commands.add_parser("certs", help="CA, TLS certificates and SuperNode auth keys for a consortium")
    certs.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="directory for the CA, the SuperLink's certificate and each site's keys")
    certs.add_argument("--sites", required=True, help="comma-separated site ids, e.g. hospital_a,hospital_b")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="extra DNS name or IP of the coordinator (repeatable); localhost is always in")
    certs.add_argument("--site-host", action="append", default=[], metavar="SITE=NAME",
                       help="extra DNS name or IP for a site's own gRPC service certificate (repeatable)")
    certs.set_defaults(handler=run_certs)

    app = commands.add_parser("app", help="write the app folder for `flwr run` (pyproject only, no data)")
    app.add_argument("--out", type=Path, required=True, metavar="DIR",
                     help="directory for the app's pyproject.toml (give it to `flwr run`)")
    add_run_config_options(app)
    app.set_defaults(handler=run_app)

    local = commands.add_parser("local", help="SuperLink + N SuperNodes on loopback, run every phase, check sites")
    local.add_argument("--sites", type=int, default=3, metavar="N", help="number of hospitals (default 3)")
    local.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                       help="TLS and SuperNode authentication (default on; --no-tls for a plain-text rehearsal)")
    local.add_argument("--data", type=Path, default=None, metavar="DIR",
                       help="consortium data folder, one sub-folder per hospital (default: data/sample)")
    local.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                       help="where keys, logs, site dirs and the report go (default: a new temp dir)")
    local.add_argument("--timeout", type=float, default=900.0, metavar="S", help="limit for the app run")
    local.add_argument("--site-worker", action=argparse.BooleanOptionalAction, default=True,
                       help="a long-lived worker beside each SuperNode answers its messages (default on; "
                            "--no-site-worker: a fresh process per message does it all, as Flower starts it)")
    add_run_config_options(local)
    local.set_defaults(handler=run_local)


def add_run_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one short round of every phase on a small model (and, locally, 40 patients a site)")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="set a run config value of the app (repeatable; VALUE in TOML syntax)")
    parser.add_argument("--app-pyproject", type=Path, default=None, metavar="FILE",
                        help="pyproject.toml of the Flower app (default: the one PMLM was installed from)")


def _run_config(args) -> dict:
    from pmlm.deploy.app_bundle import QUICK_RUN_CONFIG, parse_run_config

    try:
        given = parse_run_config(args.run_config)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return {**(QUICK_RUN_CONFIG if args.quick else {}), **given}


def run_certs(args) -> int:
    from pmlm.deploy.certs import make_deploy_keys

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    if not sites:
        raise CliError("--sites names no site")
    site_hosts: dict[str, list[str]] = {}
    for pair in args.site_host:
        site, sep, host = pair.partition("=")
        if not sep or site not in sites:
            raise CliError(f"--site-host must be SITE=NAME for a site in --sites, got {pair!r}")
        site_hosts.setdefault(site, []).append(host)
    paths = make_deploy_keys(args.out, sites, args.host, site_hosts)
    print(f"wrote the consortium CA, the SuperLink certificate and keys for {len(sites)} sites to {args.out}")
    for role, path in paths.items():
        print(f"  {role:28s} {path}")
    print("private keys (*.key) are mode 0600: copy each to its host only, never into a repository")
    return 0


def run_app(args) -> int:
    from pmlm.deploy.app_bundle import find_app_pyproject, write_app_bundle_dir

    try:
        folder = write_app_bundle_dir(args.out, args.app_pyproject or find_app_pyproject(), _run_config(args))
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {folder / 'pyproject.toml'}; run it with: flwr run {folder} pmlm --stream")
    return 0


def run_local(args) -> int:
    from pmlm.client.sites import SAMPLE_DATA, discover_sites
    from pmlm.deploy.local import SCRIPTS, LocalDeployment, quick_slice

    if not SCRIPTS.is_dir():
        raise CliError(f"pmlm deploy local runs from a source checkout: {SCRIPTS} is missing")

    data = args.data or SAMPLE_DATA
    try:
        available = discover_sites(data)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    if args.sites < 1 or args.sites > len(available):
        raise CliError(f"--sites {args.sites}: {data} holds {len(available)} hospitals ({', '.join(available)})")
    sites = dict(sorted(available.items())[:args.sites])
    run_dir = Path(args.workdir or tempfile.mkdtemp(prefix="pmlm-deploy-")).resolve()
    logs.default_log_file(run_dir / "logs" / logs.LOG_FILE_NAME)  # beside the SuperLink's and SuperNodes' logs
    if args.quick:
        sites = quick_slice(sites, run_dir / "data")
    print(f"pmlm deploy local: {len(sites)} sites, TLS {'on' if args.tls else 'OFF'}, workdir {run_dir}", flush=True)
    deployment = LocalDeployment(run_dir, sites, tls=args.tls, run_config=_run_config(args),
                                 timeout_s=args.timeout, app_pyproject=args.app_pyproject,
                                 site_worker=args.site_worker)
    ok = deployment.run()
    failed = [c.name for c in deployment.checks if not c.ok]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in deployment.timings.items())
    print(f"{'all checks held' if ok else 'FAILED: ' + '; '.join(failed)} ({timings})")
    print(f"report: {run_dir / 'deploy_report.json'}; logs: {run_dir / 'logs'}")
    return 0 if ok else 1
