"""`pmlm serve`: the site's gRPC services (pmlm.v1.PromptService, pmlm.v1.AuditService) over TLS.

  pmlm serve --site SITE_DIR --cert service.pem --key service.key --client-ca ca.pem [--address HOST:PORT]
  pmlm serve --site SITE_DIR --insecure-loopback [--cert ... --key ...] [--address 127.0.0.1:PORT]

SITE_DIR is the SuperNode's site directory with its site.json (client/site_config.py). The service is
closed by default: mutual TLS with --client-ca, and only certificates naming this site get in (the
SITE/client.pem that `pmlm deploy certs` issues, CN=pmlm-client-SITE, or the subjects listed in
site.json's "allowed_clients"); a certificate of another site of the same CA is answered
PERMISSION_DENIED. --insecure-loopback drops client authentication (and TLS, without --cert/--key)
for local tries and is refused on any address but 127.0.0.0/8, ::1 or localhost. Every call, allowed
or denied, goes to SITE_DIR/audit/access_log.jsonl (`pmlm audit access SITE_DIR`); library warnings
and errors go to SITE_DIR/audit/serve.log (and to the console with --verbose).
Stops cleanly on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pmlm import logs
from pmlm.cli import CliError
from pmlm.common.site_layout import ACCESS_LOG

# The service's own log (library warnings, errors), beside the access log; common/site_layout.py could name it.
SERVE_LOG = ACCESS_LOG.with_name("serve.log")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve the site's PromptService and AuditService over TLS",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--site", type=Path, required=True, metavar="DIR", help="the site directory (with site.json)")
    serve.add_argument("--address", default="127.0.0.1:50051", metavar="HOST:PORT",
                       help="where to listen (default 127.0.0.1:50051; port 0 picks a free one)")
    serve.add_argument("--cert", type=Path, help="TLS certificate of the service (PEM)")
    serve.add_argument("--key", type=Path, help="its private key (PEM)")
    serve.add_argument("--client-ca", type=Path, default=None,
                       help="the CA whose client certificates may call (mutual TLS; required unless "
                            "--insecure-loopback)")
    serve.add_argument("--insecure-loopback", action="store_true",
                       help="serve without client certificates (and in plaintext without --cert/--key); "
                            "only on a loopback address")
    serve.add_argument("--workers", type=int, default=32,
                       help="calls served at once (default 32; Advise calls wait in them for the LLM's turn, "
                            "and up to 4x as many more wait for a worker before RESOURCE_EXHAUSTED)")
    serve.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    from pmlm.client.grpc_service import InsecureServiceError, SiteState, TlsFiles, is_loopback_address, start_server
    from pmlm.client.site_config import SiteConfigError

    # Refused before the site's records are opened: a service that would be open to the network never starts.
    if args.insecure_loopback and not is_loopback_address(args.address):
        raise CliError(f"--insecure-loopback serves only on a loopback address (127.0.0.0/8, ::1, localhost), "
                       f"not {args.address}")
    if (args.cert is None) != (args.key is None):
        raise CliError("give --cert and --key together")
    if args.cert is None and not args.insecure_loopback:
        raise CliError("--cert and --key are required (TLS), unless --insecure-loopback")
    if args.client_ca is None and not args.insecure_loopback:
        raise CliError("--client-ca is required: only clients with a certificate of that CA naming this site may "
                       "call (use --insecure-loopback to serve on loopback without client certificates)")
    for path in (args.cert, args.key, args.client_ca):
        if path is not None and not path.is_file():
            raise CliError(f"no such file: {path}")
    try:
        site = SiteState(args.site)
    except (SiteConfigError, FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    log_path = logs.default_log_file(args.site / SERVE_LOG)
    try:
        tls = TlsFiles(args.cert, args.key, args.client_ca) if args.cert is not None else None
        server, port = start_server(site, args.address, tls, args.workers, insecure_loopback=args.insecure_loopback)
    except InsecureServiceError as exc:
        site.close()
        raise CliError(str(exc)) from None
    except (OSError, RuntimeError) as exc:
        site.close()
        raise CliError(f"cannot serve on {args.address}: {exc}") from None
    host = args.address.rsplit(":", 1)[0]
    mode = ("mutual TLS" if args.client_ca else "TLS") if args.cert else "plaintext"
    if args.insecure_loopback and not args.client_ca:
        mode += ", no client authentication: loopback only"
    print(f"pmlm serve: site {site.config.site_id} on {host}:{port} ({mode}); "
          f"pmlm.v1.PromptService, pmlm.v1.AuditService" + (f"; log {log_path}" if log_path else ""), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds to the finally below
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(5).wait()
        site.close()
    return 0
