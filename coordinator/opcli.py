"""The operator's commands of `fedslim-coordinator`, over the REST API (so they work against
a remote coordinator): create/list/get/start/pause/resume/stop/metrics, agents/revoke/rotate,
`watch FEDERATION` (live progress of the round in flight), `token` management (the admin
token) and `enroll-token create|list|revoke` (one-time enrollment tokens for devices).

Where the URL and admin token come from, first match wins: --url/--token, FEDSLIM_URL /
FEDSLIM_ADMIN_TOKEN, the file `token set` wrote ($FEDSLIM_CONFIG, else
$XDG_CONFIG_HOME/fedslim/cli.json, mode 0600), then http://127.0.0.1:8080 and the dev-mode
placeholder token. Every failure is one line on stderr and a nonzero exit, never a
traceback. Responses are read at most `MAX_RESPONSE_BYTES` and validated before use;
server text is stripped of control characters before it reaches a terminal.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CliError", "add_commands", "run_command"]

DEFAULT_URL = "http://127.0.0.1:8080"
DEV_TOKEN = "dev-admin-token"  # what a `serve --dev` coordinator accepts
MAX_RESPONSE_BYTES = 32 << 20  # the longest answer: a federation's per-round metrics
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class CliError(Exception):
    """A failure to report as one line (exit status 1)."""


def clean(text: object, limit: int = 500) -> str:
    """Server-provided text made safe for a terminal line: no escapes, no newlines, bounded."""
    s = _CONTROL.sub(" ", str(text))
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ----------------------------------------------------------------------------- where and who
def config_path() -> Path:
    if os.environ.get("FEDSLIM_CONFIG"):
        return Path(os.environ["FEDSLIM_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "fedslim" / "cli.json"


def _saved() -> dict[str, str]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: unreadable ({exc}); `fedslim-coordinator token clear` removes it") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise CliError(f"{path}: not a token file; `fedslim-coordinator token clear` removes it")
    return data


def resolve(args: argparse.Namespace) -> tuple[str, str, str]:
    """(url, token, where the token came from)."""
    saved = _saved()
    url = args.url or os.environ.get("FEDSLIM_URL") or saved.get("url") or DEFAULT_URL
    for source, token in (("--token", args.token), ("FEDSLIM_ADMIN_TOKEN", os.environ.get("FEDSLIM_ADMIN_TOKEN")),
                          (str(config_path()), saved.get("token"))):
        if token:
            return url.rstrip("/"), token, source
    return url.rstrip("/"), DEV_TOKEN, "the dev-mode placeholder"


# ----------------------------------------------------------------------------- HTTP
class Api:
    """An admin client: one request → parsed JSON, or a CliError that reads as one line."""

    def __init__(self, url: str, token: str, cacert: str | None = None, timeout: float = 30.0) -> None:
        import httpx

        # --cacert pins the CA for an https coordinator (a self-signed one, say); without it
        # httpx honours SSL_CERT_FILE / SSL_CERT_DIR, else certifi's bundle.
        try:
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cacert) if cacert else True
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"--cacert {cacert}: {exc}") from None
        if not url.startswith(("http://", "https://")):
            raise CliError(f"--url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                 verify=verify)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            with self.http.stream(method, path, json=body) as resp:
                data = bytearray()
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise CliError(f"{method} {path}: answer exceeds {MAX_RESPONSE_BYTES} bytes")
        except httpx.TransportError as exc:
            reason = clean(exc) or type(exc).__name__
            raise CliError(f"cannot reach the coordinator at {self.url}: {reason}") from None
        if resp.is_error:
            raise CliError(f"{method} {path}: {resp.status_code} {_detail(bytes(data))}")
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise CliError(f"{method} {path}: the answer is not JSON (is {self.url} a fedslim coordinator?)") from None


def _detail(body: bytes) -> str:
    """The `detail` of an error answer, on one line (a 422's list compacted)."""
    try:
        detail = json.loads(body).get("detail", body.decode(errors="replace"))
    except (ValueError, AttributeError):
        detail = body.decode(errors="replace")
    if isinstance(detail, list):
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" if isinstance(d, dict) else str(d)
                           for d in detail[:5])
    return clean(detail, 300)


def _expect(data: Any, kind: type, what: str) -> Any:
    if not isinstance(data, kind):
        raise CliError(f"unexpected answer for {what}: {clean(data, 120)}")
    return data


# ----------------------------------------------------------------------------- commands
def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _fid(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{1,64}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a federation or agent id (hex)")
    return value


def _create(api: Api, args: argparse.Namespace) -> int:
    body: Any = {}
    if args.config:
        try:
            body = json.loads(Path(args.config).read_text())
        except OSError as exc:
            raise CliError(f"{args.config}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CliError(f"{args.config}: not JSON ({exc})") from None
    _print_json(api.call("POST", "/v1/federations", body))
    return 0


def _simple(method: str, path: str) -> Callable[[Api, argparse.Namespace], int]:
    def run(api: Api, args: argparse.Namespace) -> int:
        _print_json(api.call(method, path.format(**vars(args))))
        return 0

    return run


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(value: str) -> float:
    """'90', '90s', '30m', '24h', '7d' -> seconds (argparse type)."""
    m = _DURATION.fullmatch(value.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration like 30m, 24h or 7d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _enroll_token(api: Api, args: argparse.Namespace) -> int:
    if args.action == "create":
        issued = _expect(api.call("POST", "/v1/enrollment-tokens", {"expires_in_s": args.expires, "name": args.name}),
                         dict, "enroll-token create")
        if args.quiet:  # the secret alone, for scripts: TOKEN=$(fedslim-coordinator enroll-token create -q)
            print(clean(issued.get("token", "")))
        else:
            _print_json(issued)
        return 0
    if args.action == "list":
        _print_json(api.call("GET", "/v1/enrollment-tokens"))
        return 0
    if not args.id:
        raise CliError("enroll-token revoke needs the token's id (see `enroll-token list`)")
    _print_json(api.call("DELETE", f"/v1/enrollment-tokens/{args.id}"))
    return 0


def _watch(api: Api, args: argparse.Namespace) -> int:
    from coordinator.watch import watch

    return watch(api, args.federation, interval=args.interval, timeout=args.timeout)


def _token(args: argparse.Namespace) -> int:
    path = config_path()
    if args.action == "generate":  # a secret for FEDSLIM_ADMIN_TOKEN / FEDSLIM_ENROLLMENT_TOKEN
        from coordinator.auth import new_secret

        print(new_secret())
        return 0
    if args.action == "clear":
        path.unlink(missing_ok=True)
        print(f"removed {path}")
        return 0
    if args.action == "show":
        url, token, source = resolve(args)
        print(f"url {url}\ntoken {token[:4]}… ({len(token)} characters, from {source})")
        return 0
    token = args.token or (sys.stdin.readline().strip() if args.stdin else getpass.getpass("admin token: ").strip())
    if not token:
        raise CliError("no token given")
    url = (args.url or os.environ.get("FEDSLIM_URL") or DEFAULT_URL).rstrip("/")
    if not args.no_check:
        with Api(url, token, args.cacert) as api:
            api.call("GET", "/v1/federations")  # a wrong token fails here, not at the next command
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
    os.replace(tmp, path)
    print(f"saved the token for {url} in {path}")
    return 0


_COMMANDS: dict[str, tuple[str, Callable[[Api, argparse.Namespace], int]]] = {
    "create": ("create a federation from a FederationCreate JSON file (defaults without one)", _create),
    "list": ("list federations (JSON)", _simple("GET", "/v1/federations")),
    "get": ("one federation (JSON)", _simple("GET", "/v1/federations/{federation}")),
    "start": ("start a federation", _simple("POST", "/v1/federations/{federation}/start")),
    "pause": ("pause a federation (the open round may still close)", _simple("POST", "/v1/federations/{federation}/pause")),
    "resume": ("resume a paused federation", _simple("POST", "/v1/federations/{federation}/resume")),
    "stop": ("stop a federation for good", _simple("POST", "/v1/federations/{federation}/stop")),
    "metrics": ("per-round metrics (JSON)", _simple("GET", "/v1/federations/{federation}/rounds")),
    "live": ("the round in flight (JSON)", _simple("GET", "/v1/federations/{federation}/live")),
    "watch": ("follow the round in flight until the federation ends", _watch),
    "agents": ("list agents (JSON)", _simple("GET", "/v1/agents")),
    "revoke": ("revoke an agent's token", _simple("DELETE", "/v1/agents/{agent}")),
    "rotate": ("give an agent a new token (printed once; the old one stops working)",
               _simple("POST", "/v1/agents/{agent}/rotate")),
}


def _connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"coordinator base URL (FEDSLIM_URL; default {DEFAULT_URL})")
    p.add_argument("--token", help="admin token (FEDSLIM_ADMIN_TOKEN, else the saved one; see `token set`)")
    p.add_argument("--cacert", help="CA bundle (PEM) to verify an https --url with (default: SSL_CERT_FILE, certifi)")


def add_commands(sub: Any) -> None:
    """Register the operator commands on `fedslim-coordinator`'s subparsers."""
    for name, (helptext, func) in _COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        _connection_flags(p)
        if name == "create":
            p.add_argument("config", nargs="?", help="JSON file (FederationCreate); defaults otherwise")
        elif name in ("revoke", "rotate"):
            p.add_argument("agent", type=_fid)
        elif name not in ("list", "agents"):
            p.add_argument("federation", type=_fid)
        if name == "watch":
            p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
            p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 3)")
        p.set_defaults(func=run_command, op=func)
    tok = sub.add_parser("token", help="save, show or clear the admin token; generate a new secret")
    tok.add_argument("action", choices=["set", "show", "clear", "generate"])
    _connection_flags(tok)
    tok.add_argument("--stdin", action="store_true", help="`set`: read the token from stdin (else a prompt)")
    tok.add_argument("--no-check", action="store_true", help="`set`: save without trying it on the coordinator")
    tok.set_defaults(func=run_command, op=None)
    enr = sub.add_parser("enroll-token", help="one-time enrollment tokens for devices: create, list, revoke",
                         description="A one-time token enrolls one device once, before it expires.")
    enr.add_argument("action", choices=["create", "list", "revoke"])
    enr.add_argument("id", nargs="?", type=_fid, help="`revoke`: the token's id")
    _connection_flags(enr)
    enr.add_argument("--expires", type=duration_s, default=86400.0, metavar="DURATION",
                     help="`create`: valid for this long, e.g. 30m, 24h (default), 7d")
    enr.add_argument("--name", default="", help="`create`: a label for the device it is meant for")
    enr.add_argument("-q", "--quiet", action="store_true", help="`create`: print the token only")
    enr.set_defaults(func=run_command, op=_enroll_token)


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.op is None:
            return _token(args)
        url, token, _ = resolve(args)
        with Api(url, token, args.cacert) as api:
            return int(args.op(api, args))
    except CliError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    print(f"fedslim-coordinator: {message}", file=sys.stderr)
    return 1
