"""Prometheus metrics of one coordinator (`GET /metrics`, text exposition format).

Every `Metrics` has its own `CollectorRegistry`, never prometheus_client's global one, so
several apps in one process (tests, a bench) count apart. The service calls the small
methods here at round events; the API layer counts uploads and downloads, and
`UploadOutcomes` (ASGI middleware) counts every refused upload by the status it got,
including refusals made before any route runs (body cap, authentication).

Label values are fixed sets (`REJECT_REASONS`): nothing from the network becomes a label.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "REJECT_REASONS", "Metrics", "UploadOutcomes", "reject_reason"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# HTTP status of a refused upload -> reason label (coordinator/errors.py's mapping, reversed)
REJECT_REASONS = {
    401: "unauthorized",  # no or unknown agent token
    403: "forbidden",  # an admin token, or an agent outside the federation
    404: "not_found",  # no such federation
    408: "timeout",  # the body did not arrive within body_timeout_s
    409: "stale",  # round closed or not open, not selected, deadline passed, conflicting or copied update
    413: "too_large",  # over max_upload_bytes, or a report header over max_json_bytes
    422: "invalid",  # malformed, wrong shape, NaN/Inf, above the norm bound, bad report
    429: "rate_limited",
    503: "unavailable",  # disk or database trouble: nothing was accepted
}
_UPLOAD = re.compile(r"^/v1/federations/[^/]+/rounds/[^/]+/update$")
# seconds: a LeNet round closes in ~50 ms, a ResNet-56 one (server-side evaluation included) in seconds
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def reject_reason(status: int) -> str:
    return REJECT_REASONS.get(status, "other")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds_opened = Counter("fedslim_rounds_opened", "Round attempts opened (a retry of a round counts again)",
                                     registry=r)
        self.rounds_closed = Counter("fedslim_rounds_closed", "Rounds closed into a new global model version", registry=r)
        self.updates_accepted = Counter("fedslim_updates_accepted", "Updates accepted and folded (each once)", registry=r)
        self.updates_duplicate = Counter("fedslim_updates_duplicate",
                                         "Retries of an accepted update, answered 200 and not counted again", registry=r)
        self.updates_rejected = Counter("fedslim_updates_rejected", "Uploads refused, by reason", ["reason"], registry=r)
        for reason in {*REJECT_REASONS.values(), "other"}:  # every series exists from the start (rate() needs it)
            self.updates_rejected.labels(reason)
        self.bytes_up = Counter("fedslim_bytes_up", "Bytes of accepted update bodies", registry=r)
        self.bytes_down = Counter("fedslim_bytes_down", "Bytes of models, patches and reshapes served", registry=r)
        self.aggregation_seconds = Histogram(
            "fedslim_aggregation_seconds", "Reducing a round's updates and the strategy's aggregate step",
            buckets=_BUCKETS, registry=r)
        self.round_close_seconds = Histogram(
            "fedslim_round_close_seconds", "Closing a round: aggregation, evaluation, blobs and the commit",
            buckets=_BUCKETS, registry=r)
        self.agents_online = Gauge("fedslim_agents_online", "Agents seen within agent_timeout_s, not revoked",
                                   registry=r)
        self.polls_waiting = Gauge("fedslim_long_polls_waiting", "Task long polls waiting now", registry=r)

    # ---- called by the service
    def round_opened(self) -> None:
        self.rounds_opened.inc()

    def aggregated(self, seconds: float) -> None:
        self.aggregation_seconds.observe(seconds)

    def round_closed(self, seconds: float) -> None:
        self.rounds_closed.inc()
        self.round_close_seconds.observe(seconds)

    # ---- called by the API layer
    def update_received(self, nbytes: int, *, duplicate: bool) -> None:
        if duplicate:
            self.updates_duplicate.inc()
        else:
            self.updates_accepted.inc()
            self.bytes_up.inc(nbytes)

    def served(self, nbytes: int) -> None:
        self.bytes_down.inc(nbytes)

    def watch_online(self, count: Callable[[], int]) -> None:
        """Read the online agents at scrape time (`count` queries the store); NaN while the
        database cannot answer, so a scrape still succeeds."""
        def read() -> float:
            try:
                return float(count())
            except Exception:  # the scrape must not fail with the database
                return math.nan

        self.agents_online.set_function(read)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class UploadOutcomes:
    """Counts each refused `PUT .../update` by the status it was answered with (outermost
    but for the request log, so the body cap's and authentication's refusals count too)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") != "PUT" or not _UPLOAD.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return

        started = False

        async def observe(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    self.metrics.updates_rejected.labels(reject_reason(int(message["status"]))).inc()
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except Exception:  # unhandled: the server answers 500 outside this middleware
            if not started:
                self.metrics.updates_rejected.labels("other").inc()
            raise
