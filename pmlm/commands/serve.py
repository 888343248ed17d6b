"""`pmlm serve`: the site's gRPC services (pmlm.v1.PromptService, pmlm.v1.AuditService) over TLS.

  pmlm serve --site SITE_DIR --cert service.pem --key service.key [--client-ca ca.pem] [--address HOST:PORT]

SITE_DIR is the SuperNode's site directory with its site.json (client/site_config.py). TLS is
always on; with --client-ca only clients holding a certificate from that CA get in (mutual TLS),
which is what `pmlm deploy certs` issues as SITE/client.pem. Stops cleanly on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pmlm.cli import CliError


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve the site's PromptService and AuditService over TLS",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--site", type=Path, required=True, metavar="DIR", help="the site directory (with site.json)")
    serve.add_argument("--address", default="127.0.0.1:50051", metavar="HOST:PORT",
                       help="where to listen (default 127.0.0.1:50051; port 0 picks a free one)")
    serve.add_argument("--cert", type=Path, required=True, help="TLS certificate of the service (PEM)")
    serve.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    serve.add_argument("--client-ca", type=Path, default=None,
                       help="require client certificates issued by this CA (mutual TLS)")
    serve.add_argument("--workers", type=int, default=32,
                       help="calls served at once (default 32; Advise calls wait in them for the LLM's turn, "
                            "and up to 4x as many more wait for a worker before RESOURCE_EXHAUSTED)")
    serve.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    from pmlm.client.grpc_service import SiteState, TlsFiles, start_server
    from pmlm.client.site_config import SiteConfigError

    for path in (args.cert, args.key, args.client_ca):
        if path is not None and not path.is_file():
            raise CliError(f"no such file: {path}")
    try:
        site = SiteState(args.site)
    except (SiteConfigError, FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    try:
        server, port = start_server(site, args.address, TlsFiles(args.cert, args.key, args.client_ca), args.workers)
    except (OSError, RuntimeError) as exc:
        site.close()
        raise CliError(f"cannot serve on {args.address}: {exc}") from None
    host = args.address.rsplit(":", 1)[0]
    mode = "mutual TLS" if args.client_ca else "TLS"
    print(f"pmlm serve: site {site.config.site_id} on {host}:{port} ({mode}); "
          f"pmlm.v1.PromptService, pmlm.v1.AuditService", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds to the finally below
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(5).wait()
        site.close()
    return 0
