"""Structured logs: one JSON object per line (stdlib logging), and a request id per request.

`RequestLog` (pure ASGI middleware, outermost) gives every request an id — the client's
`X-Request-ID` when it is a short token, else a fresh one — answers it in the response's
`X-Request-ID`, keeps it in a context variable while the request runs (so the service's
log lines during the request carry it, thread-pool endpoints included), and logs one line
per request when the response is done. Round events are the service's own log lines
(`fedslim.coordinator`: round opened / closed / declined, federation failures), one line
each.

`configure(settings)` (from `create_app`) points the `fedslim` loggers at one stderr handler
with `JsonFormatter` when `log_format` is "json"; "text" leaves logging as the CLI set it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime, timezone
from typing import IO, Any

__all__ = ["REQUEST_ID_HEADER", "JsonFormatter", "RequestLog", "configure", "current_request_id"]

REQUEST_ID_HEADER = "X-Request-ID"
# what a client may choose as its id: short, and harmless in a header and a log line
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MAX_PATH = 200  # of a request's path in its log line (a head may carry 16 KiB of it)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedslim_request_id", default=None)
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_HANDLER_NAME = "fedslim-json"

access_log = logging.getLogger("fedslim.access")


def current_request_id() -> str | None:
    return _request_id.get()


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "request_id"?, ...extra, "exc"?}` on one line: json.dumps
    escapes newlines, so a message or traceback never splits a record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = _request_id.get()
        if rid is not None:
            out["request_id"] = rid
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(log_format: str, level: str = "INFO", *, stream: IO[str] | None = None) -> None:
    """Idempotent: replaces the handler an earlier call installed."""
    root = logging.getLogger("fedslim")
    for h in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(h)
    if log_format != "json":
        root.propagate = True
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False  # not twice: the CLI's basicConfig handler on the root logger stays text


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers") or []:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _CLIENT_ID.match(text) else uuid.uuid4().hex
    return uuid.uuid4().hex


class RequestLog:
    """Request id in, request id out, one `fedslim.access` line per request."""

    def __init__(self, app: ASGIApp, *, enabled: bool = True) -> None:
        self.app, self.enabled = app, enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id_from(scope)
        token = _request_id.set(rid)
        started, status, sent = time.perf_counter(), 500, 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                route = scope.get("route")
                access_log.info(
                    "%s %s %d", scope.get("method"), getattr(route, "path", None) or scope.get("path", "")[:_MAX_PATH],
                    status, extra={
                        "method": scope.get("method"), "path": scope.get("path", "")[:_MAX_PATH],
                        "route": getattr(route, "path", None), "status": status, "bytes_out": sent,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                        "client": (scope.get("client") or ("", 0))[0],
                    })
            _request_id.reset(token)
