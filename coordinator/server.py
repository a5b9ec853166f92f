"""Run the coordinator under uvicorn with limits against slow and idle clients.

uvicorn (0.54, h11 and httptools alike) schedules `timeout_keep_alive` only after a
response has been sent, and cancels it on *every* byte received. So a connection that
opens and sends nothing, or sends a request head one byte every few seconds
(slow-loris), is held forever: each costs a file descriptor and counts against
`limit_concurrency` until the coordinator answers 503 to everyone. We subclass uvicorn's
protocol with a *total* deadline for the request head: from the connection being made,
or from the first byte after a response, the complete head must arrive within
`settings.header_timeout_s`, or the connection is closed (as nginx's
`client_header_timeout` does), and with a cap on the head's size. Body reads are bounded
in the upload handler (`body_timeout_s`), not here.

The protocol is httptools' (llhttp, C) on uvloop when both are installed, which costs the
event loop about half of what h11 (pure Python) on asyncio does per request (measured:
/health 0.13 vs 0.25 ms of server CPU, a no-wait poll 0.29 vs 0.47 ms); otherwise h11 on
asyncio, with the same deadline and cap (`settings.http` chooses explicitly).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # the fast path (the `coordinator` extra pins both); h11 on asyncio without them
    import httptools
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - exercised where the wheels are missing
    httptools = uvloop = None  # type: ignore[assignment]
    HttpToolsProtocol = None  # type: ignore[assignment, misc]

from coordinator.settings import CoordinatorSettings

__all__ = ["MAX_REQUEST_HEAD_BYTES", "build_uvicorn_config", "fast_http_available", "head_deadline_protocol", "serve"]

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


class _HeadClock:
    """The head deadline of one connection: armed while a request head is awaited (later
    bytes do not re-arm it), cancelled once the head is parsed; when it runs out,
    `expire` closes the connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, expire: Callable[[], None]) -> None:
        self._loop, self._timeout_s, self._expire = loop, timeout_s, expire
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout_s, self._fire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._expire()


def _between_requests(cycle: Any) -> bool:
    """No request is being served on the connection (none yet, or its response is out)."""
    return cycle is None or cycle.response_complete


class _HeadDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on receiving each request head, and a cap on
    its size."""

    header_timeout_s: float = 10.0  # set per server by head_deadline_protocol()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadCappedConnection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        self._head_clock = _HeadClock(self.loop, self.header_timeout_s, self._head_timed_out)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_clock.arm()  # a fresh connection must send a head: no idle sockets

    def data_received(self, data: bytes) -> None:
        # Between requests the clock starts at the first byte and is not reset by later
        # ones (uvicorn's keep-alive timer is, which is what lets a trickle live forever).
        # "Between requests" includes an early response (401, 413) while the client still
        # sends a body nobody will read.
        if _between_requests(self.cycle):
            self._head_clock.arm()
        super().data_received(data)
        if not _between_requests(self.cycle):  # a head was parsed: the app owns the request now
            self._head_clock.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_clock.cancel()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        if self.transport.is_closing():
            return
        # Close without a response, like uvicorn's keep-alive handler and nginx: the
        # client that stalls is rarely one that reads a 408.
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools turns it into HttpParserCallbackError,
    which uvicorn answers with 400 and a close, before any app code runs."""


if HttpToolsProtocol is not None:

    class _HeadDeadlineHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc, valid-type]
        """uvicorn's httptools protocol plus the same head deadline and head cap."""

        header_timeout_s: float = 10.0  # set per server by head_deadline_protocol()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_clock = _HeadClock(self.loop, self.header_timeout_s, self._head_timed_out)
            self._head_bytes = 0  # of the request head being parsed (url + headers)
            self._unparsed_head = 0  # bytes received while no head was complete

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_clock.arm()

        def data_received(self, data: bytes) -> None:
            between = _between_requests(self.cycle)
            if between:
                self._head_clock.arm()
            super().data_received(data)
            if not _between_requests(self.cycle):  # a head was parsed: the app owns the request now
                self._head_clock.cancel()
                self._unparsed_head = 0
            elif between and not self.transport.is_closing():
                # a head arriving in pieces is buffered by llhttp/httptools header by header;
                # bound what is waiting (h11's max_incomplete_event_size does this there)
                self._unparsed_head += len(data)
                if self._unparsed_head > MAX_REQUEST_HEAD_BYTES:
                    self.send_400_response(f"request head exceeds {MAX_REQUEST_HEAD_BYTES} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url) + 16)  # + method, version, CRLF
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)  # ": " and CRLF, as on the wire
            super().on_header(name, value)

        def _count_head(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                raise _HeadTooLarge(f"request head of more than {MAX_REQUEST_HEAD_BYTES} bytes")

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_clock.cancel()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()  # no response, as for h11 above


def fast_http_available() -> bool:
    """httptools and uvloop are importable (the fast protocol and loop can be used)."""
    return HttpToolsProtocol is not None


def head_deadline_protocol(header_timeout_s: float, http: str = "auto") -> type[asyncio.Protocol]:
    """The protocol class for one server (uvicorn instantiates it per connection with only
    its Config, so the timeout travels as a class attribute). `http`: "httptools", "h11"
    or "auto" (httptools when installed)."""
    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
    if http == "auto":
        http = "httptools" if fast_http_available() else "h11"
    if http == "httptools":
        if not fast_http_available():
            raise ValueError("http='httptools' needs the httptools and uvloop packages")
        base: type[asyncio.Protocol] = _HeadDeadlineHttpToolsProtocol
    elif http == "h11":
        base = _HeadDeadlineH11Protocol
    else:
        raise ValueError(f"http must be auto, httptools or h11, got {http!r}")
    return type(f"HeadDeadline{base.__name__.removeprefix('_HeadDeadline')}", (base,),
                {"header_timeout_s": header_timeout_s})


def _loop_name(settings: CoordinatorSettings) -> str:
    """uvloop with the fast protocol, asyncio with h11 (what `serve` will run)."""
    return "uvloop" if settings.http != "h11" and fast_http_available() else "asyncio"


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
        loop=_loop_name(settings),
        http=head_deadline_protocol(settings.header_timeout_s, settings.http),
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
    # The ~250k objects of the imports (torch, fastapi, sqlalchemy...) live as long as the
    # process; left to the collector, every full collection walks them, holding the GIL
    # for 120–230 ms once per round or so: every request stalls that long (/health p99 at
    # 200 agents). Frozen, a collection walks only what was made since.
    gc.collect()
    gc.freeze()

    async def main() -> None:
        _bound_tls_handshake(asyncio.get_running_loop(), settings.header_timeout_s)
        await server.serve()

    if server.config.loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())
