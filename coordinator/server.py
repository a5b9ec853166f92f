"""Run the coordinator under uvicorn with limits against slow and idle clients.

uvicorn (0.54, h11 and httptools alike) schedules `timeout_keep_alive` only after a
response has been sent, and cancels it on *every* byte received. So a connection that
opens and sends nothing, or sends a request head one byte every few seconds
(slow-loris), is held forever: each costs a file descriptor and counts against
`limit_concurrency` until the coordinator answers 503 to everyone. We force the h11
protocol (one code path) and subclass it with a *total* deadline for the request head:
from the connection being made, or from the first byte after a response, the complete
head must arrive within `settings.header_timeout_s`, or the connection is closed (as
nginx's `client_header_timeout` does). Body reads are bounded in the upload handler
(`body_timeout_s`), not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from coordinator.settings import CoordinatorSettings

__all__ = ["MAX_REQUEST_HEAD_BYTES", "build_uvicorn_config", "head_deadline_protocol", "serve"]

# Request line + headers. Our largest header, the update report, is a few hundred bytes.
# h11's max_incomplete_event_size only bounds a head that is still *incomplete*; one that
# arrives whole in a single read (asyncio reads up to 256 KiB) passes, so the parsed head
# is measured too (_HeadCappedConnection). Beyond this uvicorn answers 400 and closes.
MAX_REQUEST_HEAD_BYTES = 16 << 10


class _HeadCappedConnection(h11.Connection):
    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            # as on the wire: "METHOD target HTTP/1.1\r\n" + "name: value\r\n" each
            size = len(event.method) + len(event.target) + 11 + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > MAX_REQUEST_HEAD_BYTES:
                # uvicorn turns this into 400 + close, before any app code runs
                raise h11.RemoteProtocolError(f"request head of {size} bytes", error_status_hint=431)
        return event


class _HeadDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on receiving each request head, and a cap on
    its size."""

    header_timeout_s: float = 10.0  # set per server by head_deadline_protocol()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadCappedConnection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()  # a fresh connection must send a head: no idle sockets

    def data_received(self, data: bytes) -> None:
        # Between requests the clock starts at the first byte and is not reset by later
        # ones (uvicorn's keep-alive timer is, which is what lets a trickle live forever).
        # "Between requests" includes an early response (401, 413) while the client still
        # sends a body nobody will read.
        if self._between_requests():
            self._arm_head_deadline()
        super().data_received(data)
        if not self._between_requests():  # a head was parsed: the app owns the request now
            self._cancel_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        # Close without a response, like uvicorn's keep-alive handler and nginx: the
        # client that stalls is rarely one that reads a 408.
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def head_deadline_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """The h11 protocol class for one server (uvicorn instantiates it per connection
    with only its Config, so the timeout travels as a class attribute)."""
    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
    return type("HeadDeadlineH11Protocol", (_HeadDeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})


def _tls12_or_later(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    ctx = default()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def build_uvicorn_config(app: Any, settings: CoordinatorSettings, *, log_level: str = "warning",
                         backlog: int = 2048) -> uvicorn.Config:
    """uvicorn settings for the coordinator `app` (from `create_app(settings)`)."""
    if settings.ssl_keyfile is not None and settings.ssl_certfile is None:
        raise ValueError("ssl_keyfile needs ssl_certfile (a certfile alone may hold both)")
    tls = settings.ssl_certfile is not None
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        loop="asyncio",
        http=head_deadline_protocol(settings.header_timeout_s),
        ws="none",  # no websocket routes; an upgrade would escape the head deadline
        limit_concurrency=settings.limit_concurrency,
        # uvicorn types this int but only hands it to loop.call_later: a float is fine
        timeout_keep_alive=settings.timeout_keep_alive_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        backlog=backlog,
        # long polls would hold a shutdown for their whole wait: cancel them after this
        timeout_graceful_shutdown=3,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_context_factory=_tls12_or_later if tls else None,
    )


def _bound_tls_handshake(loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
    """A TLS handshake happens before the protocol sees the connection, under asyncio's
    default 60 s `ssl_handshake_timeout`; uvicorn has no option for it, so its
    `create_server` calls get ours (a socket that never says hello is closed)."""
    create_server = loop.create_server

    async def bounded(*args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", timeout_s)
        return await create_server(*args, **kwargs)

    loop.create_server = bounded  # type: ignore[method-assign]


def serve(settings: CoordinatorSettings, *, log_level: str = "warning", backlog: int = 2048) -> None:
    """Serve the coordinator until SIGINT/SIGTERM (`fedslim-coordinator serve`)."""
    from coordinator.app import create_app  # heavy (torch): only when serving

    server = uvicorn.Server(build_uvicorn_config(create_app(settings), settings, log_level=log_level,
                                                 backlog=backlog))

    async def main() -> None:
        _bound_tls_handshake(asyncio.get_running_loop(), settings.header_timeout_s)
        await server.serve()

    asyncio.run(main())
