"""Body caps for every route, enforced before the body is read (pure ASGI middleware).

A declared Content-Length over the route's cap is answered 413 without reading a byte;
a chunked body is counted as it streams and cut off at the cap. JSON routes get
`max_json_bytes`; the update upload gets `max_upload_bytes` (its handler reads the stream
itself, with a deadline).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["BodyLimit"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_UPLOAD = re.compile(r"^/v1/federations/[^/]+/rounds/[^/]+/update$")


class _TooLarge(Exception):
    pass


class BodyLimit:
    """`limits` is read per request (any object with max_json_bytes and max_upload_bytes,
    normally the CoordinatorSettings), so an operator's change applies at once."""

    def __init__(self, app: ASGIApp, *, limits: Any) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = _UPLOAD.match(scope.get("path", ""))
        cap = int(self.limits.max_upload_bytes if upload else self.limits.max_json_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await _refuse(send, f"request body of {declared.decode(errors='replace')[:20]} bytes exceeds {cap}")
            return
        if not upload:  # small bodies: read them whole here (FastAPI would turn a raise into 400)
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > cap:
                    await _refuse(send, f"request body exceeds {cap} bytes")
                    return
                more = message.get("more_body", False)
            replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replayed() -> Message:
                return replay.pop() if replay else await receive()

            await self.app(scope, replayed, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise _TooLarge
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracking)
        except _TooLarge:
            if not started:
                await _refuse(send, f"request body exceeds {cap} bytes")


async def _refuse(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail, "error": "PayloadTooLarge"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
