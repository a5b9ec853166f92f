"""`fedslim-coordinator`: serve the API; the operator's commands over REST (coordinator/opcli.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from coordinator.opcli import add_commands

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
    add_commands(sub)  # the operator's commands over REST (coordinator/opcli.py)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
