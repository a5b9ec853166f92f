"""bench.backends end to end at a toy size, on SQLite and on the suite's PostgreSQL server:
the contract (one JSON object on stdout, a row per backend with every operation's
percentiles, the migration timed, the results file), never the timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import backends
from tests.pg import PostgresServer


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_backends_bench_measures_every_operation(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 request: pytest.FixtureRequest, backend: str) -> None:
    argv = ["--agents", "30", "--ops", "5", "--backends", backend, "--json", "--results", str(tmp_path / "b.json")]
    server: PostgresServer | None = request.getfixturevalue("postgres_server") if backend == "postgresql" else None
    url = server.create_database() if server else None
    try:
        assert backends.main(argv + (["--postgres-url", url] if url else [])) == 0
    finally:
        if server and url:
            server.drop_database(url)

    out = json.loads(capsys.readouterr().out)
    [row] = out["runs"]
    assert row["backend"] == backend and row["agents"] == 30 and row["migrate_s"] > 0
    for op in ("upload", "check", "close", "touch", "scrape"):
        assert 0 < row[op]["p50_ms"] <= row[op]["p99_ms"] and row[op]["per_s"] > 0, op
    assert json.loads((tmp_path / "b.json").read_text()) == out
