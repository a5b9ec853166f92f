"""`fedslim-coordinator`: serve the API; small admin commands over HTTP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from coordinator.app import create_app
    from coordinator.settings import CoordinatorSettings

    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "data_dir": args.data_dir, "database_url": args.database_url,
        "dev_mode": True if args.dev else None, "torch_threads": args.torch_threads,
    }.items() if v is not None}
    try:
        settings = CoordinatorSettings(**overrides)
    except ValueError as exc:
        print(f"fedslim-coordinator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _admin(args: argparse.Namespace) -> int:
    import httpx

    token = os.environ.get("FEDSLIM_ADMIN_TOKEN", "dev-admin-token")
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        if args.cmd == "create":
            body = json.loads(Path(args.config).read_text()) if args.config else {}
            resp = client.post("/v1/federations", json=body)
        elif args.cmd == "list":
            resp = client.get("/v1/federations")
        elif args.cmd == "metrics":
            resp = client.get(f"/v1/federations/{args.federation}/rounds")
        else:
            resp = client.post(f"/v1/federations/{args.federation}/{args.cmd}")
    if resp.is_error:
        print(f"{resp.status_code}: {resp.text}", file=sys.stderr)
        return 1
    print(json.dumps(resp.json(), indent=2))
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
    serve.set_defaults(func=_serve)
    for name, helptext in [("create", "create a federation from a JSON config"), ("list", "list federations"),
                           ("start", ""), ("pause", ""), ("resume", ""), ("stop", ""), ("metrics", "per-round metrics")]:
        p = sub.add_parser(name, help=helptext or f"{name} a federation")
        p.add_argument("--url", default="http://127.0.0.1:8080")
        if name == "create":
            p.add_argument("config", nargs="?", help="JSON file (FederationCreate); defaults otherwise")
        elif name != "list":
            p.add_argument("federation")
        p.set_defaults(func=_admin)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
