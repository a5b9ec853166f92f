"""`fedslim-coordinator`: serve the API; small admin commands over HTTP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from coordinator.server import serve
    from coordinator.settings import CoordinatorSettings

    # flags override FEDSLIM_* env vars, which override the defaults in CoordinatorSettings
    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "data_dir": args.data_dir, "database_url": args.database_url,
        "dev_mode": True if args.dev else None, "torch_threads": args.torch_threads,
        "ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile,
        "limit_concurrency": args.limit_concurrency, "header_timeout_s": args.header_timeout,
        "timeout_keep_alive_s": args.keep_alive_timeout,
    }.items() if v is not None}
    try:
        settings = CoordinatorSettings(**overrides)
        if settings.ssl_keyfile is not None and settings.ssl_certfile is None:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        for name in ("ssl_certfile", "ssl_keyfile"):
            path = getattr(settings, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a file")
    except ValueError as exc:
        print(f"fedslim-coordinator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(settings, log_level=args.log_level, backlog=args.backlog)
    return 0


def _admin(args: argparse.Namespace) -> int:
    import ssl

    import httpx

    token = os.environ.get("FEDSLIM_ADMIN_TOKEN", "dev-admin-token")
    # --cacert pins the CA for an https coordinator (a self-signed one, say); without it
    # httpx honours SSL_CERT_FILE / SSL_CERT_DIR, else certifi's bundle.
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=args.cacert) if args.cacert else True
    try:
        resp = _admin_request(httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {token}"},
                                           timeout=30, verify=verify), args)
    except httpx.TransportError as exc:
        print(f"fedslim-coordinator: {args.url}: {exc}", file=sys.stderr)
        return 1
    if resp.is_error:
        print(f"{resp.status_code}: {resp.text}", file=sys.stderr)
        return 1
    print(json.dumps(resp.json(), indent=2))
    return 0


def _admin_request(client: httpx.Client, args: argparse.Namespace) -> httpx.Response:
    with client:
        if args.cmd == "create":
            body = json.loads(Path(args.config).read_text()) if args.config else {}
            resp = client.post("/v1/federations", json=body)
        elif args.cmd == "list":
            resp = client.get("/v1/federations")
        elif args.cmd == "metrics":
            resp = client.get(f"/v1/federations/{args.federation}/rounds")
        else:
            resp = client.post(f"/v1/federations/{args.federation}/{args.cmd}")
    return resp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedslim-coordinator", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the coordinator (settings also from FEDSLIM_* env vars)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--database-url")
    serve.add_argument("--torch-threads", type=int)
    serve.add_argument("--dev", action="store_true", help="allow the placeholder tokens")
    serve.add_argument("--log-level", default="warning")
    serve.add_argument("--ssl-certfile", type=Path, help="PEM certificate (chain); serves https (FEDSLIM_SSL_CERTFILE)")
    serve.add_argument("--ssl-keyfile", type=Path, help="PEM private key, unless in the certfile (FEDSLIM_SSL_KEYFILE)")
    serve.add_argument("--limit-concurrency", type=int,
                       help="connections + tasks before uvicorn answers 503 (FEDSLIM_LIMIT_CONCURRENCY)")
    serve.add_argument("--header-timeout", type=float, metavar="S",
                       help="close a connection whose request head is not complete in S s (FEDSLIM_HEADER_TIMEOUT_S)")
    serve.add_argument("--keep-alive-timeout", type=float, metavar="S",
                       help="close an idle keep-alive connection after S s (FEDSLIM_TIMEOUT_KEEP_ALIVE_S)")
    serve.add_argument("--backlog", type=int, default=2048, help="listen(2) backlog")
    serve.set_defaults(func=_serve)
    for name, helptext in [("create", "create a federation from a JSON config"), ("list", "list federations"),
                           ("start", ""), ("pause", ""), ("resume", ""), ("stop", ""), ("metrics", "per-round metrics")]:
        p = sub.add_parser(name, help=helptext or f"{name} a federation")
        p.add_argument("--url", default="http://127.0.0.1:8080")
        p.add_argument("--cacert", help="CA bundle (PEM) to verify an https --url with (default: SSL_CERT_FILE, certifi)")
        if name == "create":
            p.add_argument("config", nargs="?", help="JSON file (FederationCreate); defaults otherwise")
        elif name != "list":
            p.add_argument("federation")
        p.set_defaults(func=_admin)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
