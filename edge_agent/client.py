"""The agent's HTTP client for the coordinator. The `httpx.Client` comes from outside,
so tests run it against the ASGI app in-process or a real uvicorn on loopback.

Transient failures (connection errors, timeouts, 429/5xx) are retried with exponential
backoff and full jitter; 4xx answers are final and raise `CoordinatorRefused`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from typing import Any

import httpx

from coordinator.protocol import (
    API_PREFIX,
    KIND_HEADER,
    MASK_HEADER,
    NEEDS_HEADER,
    REPORT_HEADER,
    RESHAPE_HEADER,
    VERSION_HEADER,
    EnrollRequest,
    EnrollResponse,
    Task,
    TaskDecline,
    UpdateReceipt,
    UpdateReport,
)

__all__ = ["CoordinatorClient", "CoordinatorRefused", "CoordinatorUnavailable"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RETRY_STATUS = {429, 500, 502, 503, 504}


log = logging.getLogger("fedslim.agent")


class CoordinatorRefused(Exception):
    """The coordinator answered with a final 4xx (bad token, stale round, bad update)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


class CoordinatorUnavailable(Exception):
    """Retries exhausted: the coordinator could not be reached."""


class CoordinatorClient:
    def __init__(self, http: httpx.Client, *, token: str | None = None, max_tries: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 20.0, rng: random.Random | None = None) -> None:
        self.http, self.token = http, token
        self.max_tries, self.backoff_s, self.max_backoff_s = max_tries, backoff_s, max_backoff_s
        self.rng = rng or random.Random()
        self.bytes_down = 0
        self.bytes_up = 0
        # federation -> the smallest budget (bytes) its width levels need, when none fits ours
        self.needs: dict[str, int] = {}

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(self.max_tries):
            try:
                resp = self.http.request(method, API_PREFIX + path, headers=headers, **kw)
            except httpx.TransportError as exc:
                error: str = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code not in _RETRY_STATUS:
                    if resp.is_client_error:
                        raise CoordinatorRefused(resp.status_code, _detail(resp))
                    resp.raise_for_status()
                    return resp
                error = f"HTTP {resp.status_code}"
            if attempt + 1 < self.max_tries:  # full jitter (AWS architecture blog)
                time.sleep(self.rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt)))
        raise CoordinatorUnavailable(f"{method} {path} failed {self.max_tries} times; last: {error}")

    # ------------------------------------------------------------------ API
    def enroll(self, enrollment_token: str, *, name: str, memory_budget_bytes: int | None = None,
               platform: str = "") -> EnrollResponse:
        req = EnrollRequest(enrollment_token=enrollment_token, name=name,
                            memory_budget_bytes=memory_budget_bytes, platform=platform)
        resp = self._request("POST", "/agents/enroll", json=req.model_dump())
        enrolled = EnrollResponse.model_validate_json(resp.content)
        self.token = enrolled.agent_token
        return enrolled

    def poll_task(self, wait_s: float = 20.0, *, memory_budget_bytes: int | None = None) -> Task | None:
        """Long-poll for a task; `memory_budget_bytes` restates the device's budget (a phone
        under memory pressure says so on its next poll)."""
        params: dict[str, float | int] = {"wait": wait_s}
        if memory_budget_bytes is not None:
            params["memory_budget_bytes"] = memory_budget_bytes
        resp = self._request("GET", "/tasks", params=params, timeout=wait_s + 30)
        if resp.status_code == 204:
            self.needs = _needs(resp.headers.get(NEEDS_HEADER))
            if self.needs:
                log.warning("no width level fits this agent's memory budget: %s", ", ".join(
                    f"federation {f} needs at least {n / 2**20:.1f} MiB" for f, n in sorted(self.needs.items())))
            return None
        self.needs = {}
        return Task.model_validate_json(resp.content)

    def download_model(self, federation_id: str, version: int) -> bytes:
        return self._download(f"/federations/{federation_id}/models/{version}", "model").content

    def download_patch(self, federation_id: str, version: int) -> tuple[bytes, bool, str]:
        """The delta from version-1 to `version`, whether a reshape (channel pruning) must
        be applied first, and the sha256 of `version`'s mask artifact ("" for none: else
        w⊙m follows the patch); CoordinatorRefused(404) if there is no patch."""
        resp = self._download(f"/federations/{federation_id}/models/{version}/patch", "patch")
        mask = resp.headers.get(MASK_HEADER, "")
        if mask and not _SHA256.fullmatch(mask):
            raise CoordinatorRefused(resp.status_code, f"malformed {MASK_HEADER} header")
        return resp.content, resp.headers.get(RESHAPE_HEADER) == "1", mask

    def download_mask(self, federation_id: str, version: int) -> bytes:
        """`version`'s mask artifact (sparse_kernels.masks); the caller checks its sha256."""
        return self._download(f"/federations/{federation_id}/models/{version}/mask", "mask").content

    def download_mask_patch(self, federation_id: str, version: int) -> bytes:
        """The flips from version-1's mask to `version`'s; CoordinatorRefused(404) if none."""
        return self._download(f"/federations/{federation_id}/models/{version}/mask/patch", "mask-patch").content

    def download_level(self, federation_id: str, version: int, level: int, rnd: int) -> bytes:
        """Width level `level`'s slice of `version` for round `rnd` (codec kind=model)."""
        resp = self._download(f"/federations/{federation_id}/models/{version}/levels/{level}?round={rnd}", "model")
        return resp.content

    def download_reshape(self, federation_id: str, version: int) -> bytes:
        return self._download(f"/federations/{federation_id}/models/{version}/reshape", "reshape").content

    def _download(self, path: str, kind: str) -> httpx.Response:
        resp = self._request("GET", path)
        if resp.headers.get(KIND_HEADER, kind) != kind or VERSION_HEADER not in resp.headers:
            raise CoordinatorRefused(resp.status_code, f"unexpected response for {path}")
        self.bytes_down += len(resp.content)
        return resp

    def decline_task(self, federation_id: str, rnd: int, *, reason: str, needed_bytes: int | None = None,
                     retry_after_s: float | None = None) -> None:
        """Tell the coordinator this round cannot be trained here (so it stops waiting);
        `retry_after_s`: "not now, ask again after this long" (the device's policy)."""
        body = TaskDecline(reason=reason[:500], needed_bytes=needed_bytes, retry_after_s=retry_after_s)
        self._request("POST", f"/federations/{federation_id}/rounds/{rnd}/decline", json=body.model_dump())

    def upload_update(self, federation_id: str, rnd: int, body: bytes, report: UpdateReport) -> UpdateReceipt:
        resp = self._request("PUT", f"/federations/{federation_id}/rounds/{rnd}/update", content=body,
                             headers={REPORT_HEADER: report.model_dump_json(),
                                      "Content-Type": "application/octet-stream"})
        self.bytes_up += len(body)
        return UpdateReceipt.model_validate_json(resp.content)


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail", resp.text))
    except ValueError:
        return resp.text[:500]


def _needs(header: str | None) -> dict[str, int]:
    """The NEEDS_HEADER of a 204 poll: {federation: bytes}, or {} when absent or malformed."""
    if not header or len(header) > 65536:
        return {}
    try:
        doc = json.loads(header)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k): int(v) for k, v in doc.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}
