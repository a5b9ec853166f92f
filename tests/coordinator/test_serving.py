"""A real `fedslim-coordinator serve` process on loopback: TLS, slow clients, limits.

Raw sockets play the hostile clients; the timeouts are shortened through FEDSLIM_* env
vars (head 1 s, keep-alive 2 s, different so a test can tell which one closed a socket).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from coordinator.cli import main as cli_main
from coordinator.server import MAX_REQUEST_HEAD_BYTES, build_uvicorn_config
from coordinator.settings import CoordinatorSettings

HEADER_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 2.0
PARTIAL_HEAD = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # no blank line: never complete


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _coordinator(root: Path, *extra: str, verify: ssl.SSLContext | bool = True,
                 http: str = "auto") -> Iterator[tuple[str, int]]:
    """Start a --dev coordinator (`http`: its protocol); yield (base URL, port); always stop it."""
    port = _free_port()
    scheme = "https" if "--ssl-certfile" in extra else "http"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSLIM_")}
    env.update(FEDSLIM_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S), FEDSLIM_TIMEOUT_KEEP_ALIVE_S=str(KEEP_ALIVE_S),
               FEDSLIM_HTTP=http, PYTHONUNBUFFERED="1")
    log_path = root / f"coordinator-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--dev", "--port", str(port),
             "--data-dir", str(root / f"data-{port}"), "--torch-threads", "1", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"{scheme}://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < end, "coordinator did not start\n" + log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v1/health", verify=verify, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module", params=["httptools", "h11"])
def plain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A plain-HTTP coordinator, once with each protocol: both carry the head deadline and cap."""
    with _coordinator(tmp_path_factory.mktemp("plain"), http=request.param) as server:
        yield server


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; (data, closed within `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return data, False
    return data, True


def _is_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return len(sock.recv(1)) > 0  # data on a socket that sent no complete head: not expected
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.setblocking(True)


def test_config_carries_the_settings() -> None:
    # Arrange
    settings = CoordinatorSettings(dev_mode=True, limit_concurrency=77, timeout_keep_alive_s=3.5,
                                   header_timeout_s=4.0)

    # Act
    config = build_uvicorn_config(object(), settings, log_level="error", backlog=99)

    # Assert: what uvicorn will apply, and our protocol with the head deadline: httptools on
    # uvloop by default (both are pinned), h11 on asyncio when asked
    assert (config.limit_concurrency, config.timeout_keep_alive, config.backlog) == (77, 3.5, 99)
    assert config.h11_max_incomplete_event_size == MAX_REQUEST_HEAD_BYTES
    assert isinstance(config.http, type) and config.http.header_timeout_s == 4.0  # type: ignore[attr-defined]
    assert issubclass(config.http, HttpToolsProtocol) and config.loop == "uvloop"
    slow = build_uvicorn_config(object(), CoordinatorSettings(dev_mode=True, http="h11"))
    assert isinstance(slow.http, type) and issubclass(slow.http, H11Protocol) and slow.loop == "asyncio"
    assert config.ws == "none" and not config.is_ssl
    with pytest.raises(ValueError, match="ssl_certfile"):
        build_uvicorn_config(object(), CoordinatorSettings(dev_mode=True, ssl_keyfile=Path("k.pem")))


def test_slow_loris_sockets_are_closed_and_health_stays_fast(plain: tuple[str, int]) -> None:
    url, port = plain
    with ExitStack() as stack:
        # Arrange: 200 partial heads, 10 sockets that send nothing, one that trickles a byte
        # every 0.2 s (uvicorn's keep-alive timer alone would restart on each byte)
        partial = [stack.enter_context(_raw(port)) for _ in range(200)]
        for s in partial:
            s.sendall(PARTIAL_HEAD)
        silent = [stack.enter_context(_raw(port)) for _ in range(10)]
        trickle = stack.enter_context(_raw(port))
        attack = [*partial, *silent, trickle]
        opened = time.monotonic()
        assert all(_is_open(s) for s in attack)  # the server holds them for now

        # Act: health during the attack (new connection each time), trickling meanwhile
        latencies = []
        for i in range(5):
            t = time.monotonic()
            assert httpx.get(f"{url}/v1/health", timeout=5).status_code == 200
            latencies.append(time.monotonic() - t)
            trickle.sendall(PARTIAL_HEAD[i:i + 1])
            time.sleep(0.05)
        during = time.monotonic() - opened
        deadline = opened + HEADER_TIMEOUT_S + 4
        while time.monotonic() < deadline and _is_open(trickle):
            trickle.sendall(b"X")
            time.sleep(0.2)
        outcomes = [_read_until_closed(s, max(deadline - time.monotonic(), 0.01)) for s in attack]

    # Assert
    assert max(latencies) < 1.0, latencies
    assert during < HEADER_TIMEOUT_S, f"health checks took {during:.2f} s: not during the attack"
    assert all(closed and data == b"" for data, closed in outcomes), \
        f"{sum(not c for _, c in outcomes)} of {len(outcomes)} sockets still open"


def test_idle_keep_alive_is_closed_and_a_stalled_next_head_too(plain: tuple[str, int]) -> None:
    _, port = plain
    with _raw(port) as idle, _raw(port) as stalled:
        # Arrange: one full keep-alive request on each connection
        for s in (idle, stalled):
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            s.settimeout(5)
            data = b""
            while b'"status"' not in data:
                data += s.recv(4096)
            assert data.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()

        # Act: `idle` says nothing more; `stalled` starts a second head and stops
        stalled.sendall(b"GET /v1/health HTTP/1.1\r\n")
        _, stalled_closed = _read_until_closed(stalled, 6)
        stalled_s = time.monotonic() - t0
        _, idle_closed = _read_until_closed(idle, 6)
        idle_s = time.monotonic() - t0

    # Assert: keep-alive timer for the idle one, head deadline for the stalled one
    assert idle_closed and KEEP_ALIVE_S * 0.8 < idle_s < KEEP_ALIVE_S + 3, idle_s
    assert stalled_closed and HEADER_TIMEOUT_S * 0.7 < stalled_s < HEADER_TIMEOUT_S + 3, stalled_s


@pytest.mark.parametrize("header_bytes, ok", [
    (8 << 10, True),      # half the cap: served
    (20 << 10, False),    # over the cap, likely in one read: the parsed head is measured
    (300 << 10, False),   # more than one read: the incomplete head's buffer is bounded
])
def test_request_head_size_is_capped(plain: tuple[str, int], header_bytes: int, ok: bool) -> None:
    _, port = plain
    head = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: " \
        + b"a" * header_bytes + b"\r\n\r\n"
    with _raw(port) as s:
        t = time.monotonic()
        with suppress(BrokenPipeError, ConnectionResetError):  # closed mid-send: also a refusal
            s.sendall(head)
        data, closed = _read_until_closed(s, 5)
    assert closed and time.monotonic() - t < 5, "server hung on the request"
    if ok:
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
    else:
        assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:100]


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


def test_tls_with_a_self_signed_certificate(tmp_path: Path, self_signed: tuple[Path, Path],
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = self_signed
    trust = ssl.create_default_context(cafile=str(cert))
    monkeypatch.delenv("FEDSLIM_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with _coordinator(tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), verify=trust) as (url, port):
        # https with the certificate as CA works; the default CA bundle refuses it
        resp = httpx.get(f"{url}/v1/health", verify=trust, timeout=5)
        assert resp.status_code == 200 and resp.json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/v1/health", timeout=5)
        # plain http to the TLS port gets no HTTP answer
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)

        # the admin CLI: --cacert, SSL_CERT_FILE, or a clear refusal
        assert cli_main(["list", "--url", url, "--cacert", str(cert)]) == 0
        assert capsys.readouterr().out.strip() == "[]"
        assert cli_main(["list", "--url", url]) == 1
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert cli_main(["list", "--url", url]) == 0

        # a TCP connection that never starts the handshake is closed too (asyncio's own
        # handshake timeout is 60 s)
        with _raw(port) as s:
            t = time.monotonic()
            _, closed = _read_until_closed(s, HEADER_TIMEOUT_S + 4)
        assert closed and time.monotonic() - t < HEADER_TIMEOUT_S + 4


def test_an_unfinished_oversized_head_is_refused_at_once(plain: tuple[str, int]) -> None:
    """A head that keeps coming and never ends is refused as soon as the bytes waiting for
    it pass the cap (400), not only when the head deadline closes the socket (silently);
    kills dropping the bound on the incomplete head's buffer."""
    _, port = plain
    with _raw(port) as s:
        t = time.monotonic()
        with suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(PARTIAL_HEAD + b"X-Pad: " + b"a" * (4 * MAX_REQUEST_HEAD_BYTES))  # no end of line
        data, closed = _read_until_closed(s, 5)
    assert closed and time.monotonic() - t < HEADER_TIMEOUT_S / 2, "refused only by the head deadline"
    assert data.startswith(b"HTTP/1.1 4"), data[:100]
