"""Durable coordinator state: SQLAlchemy Core tables (SQLite file by default, WAL; the
same schema on PostgreSQL through psycopg 3) plus a content-addressed blob directory for
model and update bytes. The schema is versioned by Alembic (coordinator/migrations): a
Store brings its database to the head revision when it opens it.

Blobs are written (fsync + rename) *before* the transaction that references them, so a
crash leaves at worst an unreferenced blob, never a row pointing at nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import make_url

from coordinator.migrations import upgrade

__all__ = ["AgentRow", "BlobCache", "BlobStore", "EnrollmentTokenRow", "FederationRow", "RoundRow", "Store", "UpdateRow",
           "engine_url"]

# The tables as the head migration leaves them; a change here needs a revision in
# coordinator/migrations/versions (tests/coordinator/test_migrations.py compares the two).
# Byte counts and budgets are BIGINT: PostgreSQL's INTEGER is 32-bit (a 2**40 budget, or
# 2 GiB of downloads in one round, would not fit), SQLite's is 64-bit either way.
metadata = MetaData()

federations = Table(
    "federations", metadata,
    Column("id", String(64), primary_key=True),
    Column("config", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("current_round", Integer, nullable=False),  # rounds completed
    Column("model_version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("error", Text),  # why it failed (status "failed") or why closing is backing off
)
agents = Table(
    "agents", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("enrolled_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("info", Text, nullable=False),
    Column("revoked_at", Float),  # set: the token no longer authenticates
    Column("memory_budget_bytes", BigInteger),  # as last stated (enrollment or a task poll)
)
rounds = Table(
    "rounds", metadata,
    Column("federation_id", String(64), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("status", String(16), nullable=False),  # open | closed
    Column("attempt", Integer, nullable=False),
    Column("base_version", Integer, nullable=False),
    Column("selected", Text, nullable=False),  # JSON list of agent ids
    Column("opened_at", Float, nullable=False),
    Column("deadline", Float, nullable=False),
    Column("closed_at", Float),
    Column("metrics", Text),  # JSON
)
updates = Table(
    "updates", metadata,
    Column("federation_id", String(64), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("agent_id", String(64), primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("num_samples", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("blob", String(64), nullable=False),
    Column("report", Text, nullable=False),
)
declines = Table(  # agents that answered a task with "my budget fits nothing"
    "declines", metadata,
    Column("federation_id", String(64), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("agent_id", String(64), primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("needed_bytes", BigInteger),
    Column("reason", Text, nullable=False),
    Column("declined_at", Float, nullable=False),
)
models = Table(
    "models", metadata,
    Column("federation_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("blob", String(64), nullable=False),  # full model (codec kind=model)
    Column("patch_blob", String(64)),  # delta from version-1, when the structure is unchanged
    Column("state_blob", String(64)),  # strategy state (npz, no pickle)
    Column("reshape_blob", String(64)),  # kept channels from version-1 (JSON), if pruned
    Column("mask_blob", String(64)),  # the strategy's keep-masks (sparse_kernels.masks), if it has any
    Column("mask_patch_blob", String(64)),  # their flips from version-1's masks, when both exist
    Column("created_at", Float, nullable=False),
)
downloads = Table(  # bytes served per (federation, round) for the metrics
    "downloads", metadata,
    Column("federation_id", String(64), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("bytes", BigInteger, nullable=False),
)
enrollment_tokens = Table(  # one-time enrollment tokens (issue 12): the secret only as sha256
    "enrollment_tokens", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(100), nullable=False),  # the operator's label ("pi-kitchen")
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),  # set once, by the enrollment that spent it
    Column("agent_id", String(64)),  # the agent that enrollment created
    Column("revoked_at", Float),
)


@dataclass(frozen=True)
class FederationRow:
    id: str
    config: dict[str, Any]
    status: str
    current_round: int
    model_version: int
    created_at: float
    error: str | None = None


@dataclass(frozen=True)
class AgentRow:
    id: str
    name: str
    token_hash: str
    enrolled_at: float
    last_seen: float
    info: dict[str, Any]
    revoked_at: float | None = None
    memory_budget_bytes: int | None = None


@dataclass(frozen=True)
class EnrollmentTokenRow:
    id: str
    name: str
    token_hash: str
    created_at: float
    expires_at: float
    used_at: float | None = None
    agent_id: str | None = None
    revoked_at: float | None = None

    def status(self, now: float) -> Literal["active", "used", "expired", "revoked"]:
        """used | revoked | expired | active (in that order: a used token stays "used")."""
        if self.used_at is not None:
            return "used"
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.expires_at else "active"


@dataclass(frozen=True)
class RoundRow:
    federation_id: str
    round: int
    status: str
    attempt: int
    base_version: int
    selected: list[str]
    opened_at: float
    deadline: float
    closed_at: float | None
    metrics: dict[str, Any] | None


@dataclass(frozen=True)
class UpdateRow:
    agent_id: str
    attempt: int
    num_samples: int
    bytes: int
    blob: str
    report: dict[str, Any]


class BlobStore:
    """Content-addressed files (sha256 names) written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        """Write once; on any failure (disk full, I/O error) the temporary file is removed
        and the OSError propagates, leaving nothing behind."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return digest

    def get(self, digest: str) -> bytes:
        return (self.root / digest).read_bytes()

    def path(self, digest: str) -> Path:
        return self.root / digest


class BlobCache:
    """Recently served blobs in memory, by digest (blobs are content-addressed, so an
    entry can never go stale), at most `max_bytes` in all, least recently used out."""

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def peek(self, digest: str) -> bytes | None:
        """The blob if it is in memory (no disk read: safe on the event loop)."""
        with self._lock:
            data = self._items.get(digest)
            if data is not None:
                self._items.move_to_end(digest)
            return data

    def get(self, digest: str, load: Callable[[str], bytes]) -> bytes:
        with self._lock:
            data = self._items.get(digest)
            if data is not None:
                self._items.move_to_end(digest)
                return data
        data = load(digest)
        if len(data) <= self.max_bytes // 4:
            with self._lock:
                if digest not in self._items:
                    self._items[digest] = data
                    self._size += len(data)
                while self._size > self.max_bytes:
                    self._size -= len(self._items.popitem(last=False)[1])
        return data


def engine_url(url: str) -> str:
    """`url` with PostgreSQL pointed at psycopg 3, the driver we ship: SQLAlchemy reads a
    bare postgresql:// (or the postgres:// many hosts hand out) as psycopg2."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class Store:
    def __init__(self, url: str, blob_dir: Path) -> None:
        url = engine_url(url)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        sqlite = url.startswith("sqlite")
        # as many pooled connections as request threads: no connect/discard churn under load;
        # a server database is pinged on checkout, so a restarted PostgreSQL costs one retry,
        # not a 503 per stale pooled connection
        self.engine = create_engine(url, pool_size=16, max_overflow=48, pool_pre_ping=not sqlite)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        upgrade(self.engine)
        self.blobs = BlobStore(blob_dir)

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- federations
    def add_federation(self, conn: Connection, row: FederationRow) -> None:
        conn.execute(federations.insert().values(**{**row.__dict__, "config": json.dumps(row.config)}))

    def get_federation(self, conn: Connection, fid: str) -> FederationRow | None:
        r = conn.execute(select(federations).where(federations.c.id == fid)).mappings().first()
        return _federation(r) if r else None

    def list_federations(self, conn: Connection) -> list[FederationRow]:
        rows = conn.execute(select(federations).order_by(federations.c.created_at)).mappings()
        return [_federation(r) for r in rows]

    def update_federation(self, conn: Connection, fid: str, **values: Any) -> None:
        conn.execute(federations.update().where(federations.c.id == fid).values(**values))

    # ---------------------------------------------------------------- agents
    def add_agent(self, conn: Connection, row: AgentRow) -> None:
        conn.execute(agents.insert().values(**{**row.__dict__, "info": json.dumps(row.info)}))

    def agent_by_token_hash(self, conn: Connection, token_hash: str) -> AgentRow | None:
        r = conn.execute(select(agents).where(agents.c.token_hash == token_hash)).mappings().first()
        return _agent(r) if r else None

    def list_agents(self, conn: Connection) -> list[AgentRow]:
        return [_agent(r) for r in conn.execute(select(agents).order_by(agents.c.enrolled_at)).mappings()]

    def touch_agents(self, conn: Connection, seen: dict[str, float]) -> None:
        stmt = agents.update().where(agents.c.id == bindparam("agent")).values(last_seen=bindparam("when"))
        conn.execute(stmt, [{"agent": a, "when": t} for a, t in seen.items()])

    def set_budgets(self, conn: Connection, budgets: dict[str, int]) -> None:
        stmt = agents.update().where(agents.c.id == bindparam("agent")).values(
            memory_budget_bytes=bindparam("budget"))
        conn.execute(stmt, [{"agent": a, "budget": b} for a, b in budgets.items()])

    def count_agents(self, conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(agents)).scalar() or 0)

    def count_online(self, conn: Connection, since: float) -> int:
        """Agents not revoked and seen at or after `since` (as of the last flush of last_seen)."""
        q = select(func.count()).select_from(agents).where(
            (agents.c.last_seen >= since) & agents.c.revoked_at.is_(None))
        return int(conn.execute(q).scalar() or 0)

    def get_agent(self, conn: Connection, agent_id: str) -> AgentRow | None:
        r = conn.execute(select(agents).where(agents.c.id == agent_id)).mappings().first()
        return _agent(r) if r else None

    def revoke_agent(self, conn: Connection, agent_id: str, when: float) -> None:
        conn.execute(agents.update().where(agents.c.id == agent_id).values(revoked_at=when))

    def set_agent_token(self, conn: Connection, agent_id: str, token_hash: str) -> None:
        conn.execute(agents.update().where(agents.c.id == agent_id).values(token_hash=token_hash))

    # ---------------------------------------------------------------- enrollment tokens
    def add_enrollment_token(self, conn: Connection, row: EnrollmentTokenRow) -> None:
        conn.execute(enrollment_tokens.insert().values(**row.__dict__))

    def count_enrollment_tokens(self, conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(enrollment_tokens)).scalar() or 0)

    def list_enrollment_tokens(self, conn: Connection) -> list[EnrollmentTokenRow]:
        q = select(enrollment_tokens).order_by(enrollment_tokens.c.created_at)
        return [EnrollmentTokenRow(**r) for r in conn.execute(q).mappings()]

    def get_enrollment_token(self, conn: Connection, token_id: str) -> EnrollmentTokenRow | None:
        r = conn.execute(select(enrollment_tokens).where(enrollment_tokens.c.id == token_id)).mappings().first()
        return EnrollmentTokenRow(**r) if r else None

    def spend_enrollment_token(self, conn: Connection, token_hash: str, now: float, agent_id: str) -> bool:
        """Mark the token with this hash used by `agent_id`, if it is active at `now`. One
        conditional UPDATE: of two enrollments racing with one token exactly one sees a row
        changed (PostgreSQL re-checks the WHERE after the first commits; SQLite serialises
        writers)."""
        c = enrollment_tokens.c
        result = conn.execute(enrollment_tokens.update().where(
            (c.token_hash == token_hash) & c.used_at.is_(None) & c.revoked_at.is_(None) & (c.expires_at > now)
        ).values(used_at=now, agent_id=agent_id))
        return result.rowcount == 1

    def revoke_enrollment_token(self, conn: Connection, token_id: str, when: float) -> None:
        c = enrollment_tokens.c
        conn.execute(enrollment_tokens.update().where((c.id == token_id) & c.revoked_at.is_(None)).values(revoked_at=when))

    def purge_enrollment_tokens(self, conn: Connection, before: float) -> int:
        """Forget tokens that can no longer be spent (used, revoked or expired before `before`)."""
        c = enrollment_tokens.c
        gone = (c.used_at < before) | (c.revoked_at < before) | ((c.used_at.is_(None)) & (c.expires_at < before))
        return int(conn.execute(enrollment_tokens.delete().where(gone)).rowcount or 0)

    # ---------------------------------------------------------------- rounds
    def put_round(self, conn: Connection, row: RoundRow) -> None:
        values = {**row.__dict__, "selected": json.dumps(row.selected),
                  "metrics": json.dumps(row.metrics) if row.metrics is not None else None}
        key = (rounds.c.federation_id == row.federation_id) & (rounds.c.round == row.round)
        if conn.execute(select(rounds.c.round).where(key)).first():
            conn.execute(rounds.update().where(key).values(**values))
        else:
            conn.execute(rounds.insert().values(**values))

    def get_round(self, conn: Connection, fid: str, rnd: int) -> RoundRow | None:
        key = (rounds.c.federation_id == fid) & (rounds.c.round == rnd)
        r = conn.execute(select(rounds).where(key)).mappings().first()
        return _round(r) if r else None

    def list_rounds(self, conn: Connection, fid: str) -> list[RoundRow]:
        q = select(rounds).where(rounds.c.federation_id == fid).order_by(rounds.c.round)
        return [_round(r) for r in conn.execute(q).mappings()]

    # ---------------------------------------------------------------- updates
    def add_update(self, conn: Connection, fid: str, rnd: int, row: UpdateRow) -> None:
        conn.execute(updates.insert().values(
            federation_id=fid, round=rnd, received_at=time.time(),
            **{**row.__dict__, "report": json.dumps(row.report)},
        ))

    def get_update(self, conn: Connection, fid: str, rnd: int, agent_id: str) -> UpdateRow | None:
        key = (updates.c.federation_id == fid) & (updates.c.round == rnd) & (updates.c.agent_id == agent_id)
        r = conn.execute(select(updates).where(key)).mappings().first()
        return _update(r) if r else None

    def list_updates(self, conn: Connection, fid: str, rnd: int, attempt: int) -> list[UpdateRow]:
        q = select(updates).where(
            (updates.c.federation_id == fid) & (updates.c.round == rnd) & (updates.c.attempt == attempt)
        ).order_by(updates.c.received_at)
        return [_update(r) for r in conn.execute(q).mappings()]

    def delete_update(self, conn: Connection, fid: str, rnd: int, agent_id: str) -> None:
        key = (updates.c.federation_id == fid) & (updates.c.round == rnd) & (updates.c.agent_id == agent_id)
        conn.execute(updates.delete().where(key))

    # ---------------------------------------------------------------- declines
    def add_decline(self, conn: Connection, fid: str, rnd: int, agent_id: str, attempt: int,
                    needed_bytes: int | None, reason: str) -> None:
        key = (declines.c.federation_id == fid) & (declines.c.round == rnd) & (declines.c.agent_id == agent_id)
        conn.execute(declines.delete().where(key))  # an earlier attempt's
        conn.execute(declines.insert().values(federation_id=fid, round=rnd, agent_id=agent_id, attempt=attempt,
                                              needed_bytes=needed_bytes, reason=reason, declined_at=time.time()))

    def list_declines(self, conn: Connection, fid: str, rnd: int | None = None,
                      attempt: int | None = None) -> list[dict[str, Any]]:
        q = select(declines).where(declines.c.federation_id == fid)
        if rnd is not None:
            q = q.where(declines.c.round == rnd)
        if attempt is not None:
            q = q.where(declines.c.attempt == attempt)
        return [dict(r) for r in conn.execute(q.order_by(declines.c.round, declines.c.declined_at)).mappings()]

    def needs_by_agent(self, conn: Connection) -> dict[str, dict[str, int]]:
        """agent -> federation -> the largest budget it said it needs (its latest decline)."""
        out: dict[str, dict[str, int]] = {}
        q = select(declines).where(declines.c.needed_bytes.is_not(None)).order_by(declines.c.declined_at)
        for r in conn.execute(q).mappings():
            out.setdefault(r["agent_id"], {})[r["federation_id"]] = int(r["needed_bytes"])
        return out

    # ---------------------------------------------------------------- models
    def add_model(self, conn: Connection, fid: str, version: int, blob: str,
                  patch_blob: str | None, state_blob: str | None, reshape_blob: str | None = None,
                  mask_blob: str | None = None, mask_patch_blob: str | None = None) -> None:
        conn.execute(models.insert().values(
            federation_id=fid, version=version, blob=blob, patch_blob=patch_blob,
            state_blob=state_blob, reshape_blob=reshape_blob, mask_blob=mask_blob,
            mask_patch_blob=mask_patch_blob, created_at=time.time(),
        ))

    def get_model(self, conn: Connection, fid: str, version: int) -> dict[str, Any] | None:
        key = (models.c.federation_id == fid) & (models.c.version == version)
        r = conn.execute(select(models).where(key)).mappings().first()
        return dict(r) if r else None

    # ---------------------------------------------------------------- byte counters
    def add_download_bytes(self, conn: Connection, fid: str, rnd: int, n: int) -> None:
        key = (downloads.c.federation_id == fid) & (downloads.c.round == rnd)
        if conn.execute(select(downloads.c.bytes).where(key)).first():
            conn.execute(downloads.update().where(key).values(bytes=downloads.c.bytes + n))
        else:
            conn.execute(downloads.insert().values(federation_id=fid, round=rnd, bytes=n))

    def download_bytes(self, conn: Connection, fid: str, rnd: int) -> int:
        key = (downloads.c.federation_id == fid) & (downloads.c.round == rnd)
        return int(conn.execute(select(downloads.c.bytes).where(key)).scalar() or 0)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _federation(r: Any) -> FederationRow:
    return FederationRow(r["id"], json.loads(r["config"]), r["status"], r["current_round"],
                         r["model_version"], r["created_at"], r["error"])


def _agent(r: Any) -> AgentRow:
    info = json.loads(r["info"])
    budget = r["memory_budget_bytes"] if r["memory_budget_bytes"] is not None else info.get("memory_budget_bytes")
    return AgentRow(r["id"], r["name"], r["token_hash"], r["enrolled_at"], r["last_seen"], info,
                    r["revoked_at"], budget)


def _round(r: Any) -> RoundRow:
    return RoundRow(r["federation_id"], r["round"], r["status"], r["attempt"], r["base_version"],
                    json.loads(r["selected"]), r["opened_at"], r["deadline"], r["closed_at"],
                    json.loads(r["metrics"]) if r["metrics"] else None)


def _update(r: Any) -> UpdateRow:
    return UpdateRow(r["agent_id"], r["attempt"], r["num_samples"], r["bytes"], r["blob"], json.loads(r["report"]))
