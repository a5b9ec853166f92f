"""A real, throwaway PostgreSQL server for the suite (loaded as a plugin from tests/conftest.py).

- `postgres_server` (session): initdb in a temp dir, a postmaster on a free loopback port
  (password auth, its socket in that dir), stopped and deleted at the end of the session.
  Debian's `postgresql` package provides the binaries (scripts/setup.sh installs it).
  initdb refuses to run as root, so as root the server runs as the `postgres` system user
  (created by that package) through runuser.
- `database_url`: None (the default SQLite file) unless the test is marked
  `@pytest.mark.both_databases`, which runs it once per backend; the PostgreSQL run gets
  a fresh database of its own, dropped afterwards.

Where PostgreSQL is missing the PostgreSQL runs skip, saying how to install it; under CI
(CI=true, where setup.sh must have installed it) they fail instead.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port

__all__ = ["PostgresServer", "availability", "find_postgres_bin", "launch"]

BACKENDS = ("sqlite", "postgresql")
_SUPERUSER = "fedslim"


def find_postgres_bin() -> Path | None:
    """The directory holding initdb/pg_ctl: $FEDSLIM_POSTGRES_BIN, PATH, or Debian's
    /usr/lib/postgresql/<major>/bin (not on PATH), newest major first."""
    explicit = os.environ.get("FEDSLIM_POSTGRES_BIN")
    candidates = [Path(explicit)] if explicit else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        majors = sorted((p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True)
        candidates += [p / "bin" for p in majors]
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


class PostgresServer:
    """One postmaster in `root` on 127.0.0.1:`port`; `run_as` is the OS user (as root)."""

    def __init__(self, bindir: Path, root: Path, run_as: str | None) -> None:
        self.bindir, self.root, self.run_as = bindir, root, run_as
        self.data = root / "data"
        self.password = secrets.token_hex(16)
        self.port = 0
        self._sync = ""

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}{tail}")
        return done

    def start(self, *, durable: bool = False) -> None:
        """`durable`: fsync and synchronous commits on, as a production server (bench.backends
        compares commit latency); the tests run without, on a server nobody keeps."""
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.run_as is not None:  # the server's user must own its directory
            user = pwd.getpwnam(self.run_as)
            for path in (self.root, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", _SUPERUSER, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        # fsync off for the tests: a throwaway server whose host never crashes under
        # them (they kill the coordinator, not PostgreSQL)
        self._sync = "" if durable else " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        for attempt in range(3):  # free_port() can race with another process: pick again
            self.port = free_port()
            try:
                self.resume()
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def resume(self) -> None:
        """Start the postmaster (again, after `pause`: same port, same data)."""
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   f"-c max_connections=300{self._sync}")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "-o", options, "start")

    def pause(self) -> None:
        """Stop the postmaster, disconnecting every client (a database restart, as seen by them)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{_SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _admin(self, statement: str, database: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(database)))

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._admin("CREATE DATABASE {}", name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        # FORCE: a coordinator process a test SIGKILLed may still hold a connection
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", url.rsplit("/", 1)[1])

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def availability() -> tuple[Path | None, str | None, str | None]:
    """(bindir, OS user to run as, why PostgreSQL cannot run here or None)."""
    bindir = find_postgres_bin()
    if bindir is None:
        return None, None, ("PostgreSQL server binaries not found (install the Debian package `postgresql`, "
                            "e.g. `bash scripts/setup.sh` as root, or set FEDSLIM_POSTGRES_BIN)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, None, "psycopg is not installed (pip install -c constraints.txt -e '.[dev]')"
    if os.geteuid() != 0:
        return bindir, None, None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None, None, "running as root and there is no `postgres` user for initdb (apt-get install postgresql)"
    if shutil.which("runuser") is None:
        return None, None, "running as root without runuser (util-linux) to start PostgreSQL unprivileged"
    return bindir, "postgres", None


def launch(bindir: Path, run_as: str | None, *, durable: bool = False) -> PostgresServer:
    """A started server in a fresh temp dir (the caller stops it)."""
    # mkdtemp (mode 0700) directly under the temp dir, not pytest's tmp_path: as root that
    # lies under /tmp/pytest-of-root (0700), which the postgres user could not traverse
    server = PostgresServer(bindir, Path(tempfile.mkdtemp(prefix="fedslim-pg-")), run_as)
    try:
        server.start(durable=durable)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir, run_as, why = availability()
    if why is not None or bindir is None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL tests cannot run under CI: {why}")
        pytest.skip(f"PostgreSQL unavailable: {why}")
    server = launch(bindir, run_as)
    yield server
    server.stop()


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """SQLAlchemy URL of the test's database; None means the default SQLite file."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield None
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_databases: run once on SQLite and once on a real PostgreSQL server")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_databases") and "database_url" in metafunc.fixturenames:
        metafunc.parametrize("database_url", BACKENDS, indirect=True)
