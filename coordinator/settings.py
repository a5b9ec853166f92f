"""Coordinator service settings: environment (FEDSLIM_*) and CLI flags, validated."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEV_ENROLLMENT_TOKEN", "PLACEHOLDER_TOKENS", "CoordinatorSettings"]

DEV_ENROLLMENT_TOKEN = "dev-enroll-token"
PLACEHOLDER_TOKENS = frozenset({"", "changeme", "dev-admin-token", DEV_ENROLLMENT_TOKEN})


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDSLIM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("fedslim-data")
    # SQLAlchemy URL; default is a SQLite file (WAL) under data_dir. PostgreSQL (psycopg 3):
    # postgresql://user:pass@host/db (read as postgresql+psycopg). The schema is migrated
    # to the current revision at start (coordinator/migrations).
    database_url: str | None = None
    admin_token: SecretStr = SecretStr("dev-admin-token")
    # The shared enrollment token: any device holding it may enroll, as often as it likes.
    # Unset, it is off (devices enroll with the one-time tokens `enroll-token create`
    # issues), except in dev mode, where the placeholder DEV_ENROLLMENT_TOKEN works.
    enrollment_token: SecretStr | None = None
    # Dev mode allows the placeholder tokens above; anything else must set real ones.
    dev_mode: bool = False
    max_upload_bytes: int = 64 << 20
    agent_timeout_s: float = 60.0  # an agent unseen this long is not sampled
    long_poll_s: float = 20.0
    tick_s: float = 0.2
    torch_threads: int = 1

    # ---- limits on what the network can make the coordinator hold (issue 10)
    max_json_bytes: int = 64 << 10  # every JSON body and the report header
    max_model_params: int = 50_000_000  # refused at create: a model this big would not fit
    max_eval_memory_bytes: int = 2 << 30  # server-side evaluation's activations, estimated at create
    max_agents: int = 100_000  # enrollment refuses beyond this many identities
    enroll_per_ip_per_minute: float = 30.0  # token bucket (burst = one minute's worth)
    uploads_per_agent_per_minute: float = 30.0
    uploads_per_ip_per_minute: float = 6000.0  # many devices may share one NAT address
    # ---- serving (uvicorn): connection limits and timeouts against slow or idle clients
    limit_concurrency: int = 4096  # connections + tasks; beyond this uvicorn answers 503
    timeout_keep_alive_s: float = 5.0
    header_timeout_s: float = 10.0  # a connection must send its request head within this
    # the HTTP protocol: httptools on uvloop ("auto", when installed: half h11's cost per
    # request), or "h11" on asyncio (pure Python, no compiled wheels)
    http: Literal["auto", "httptools", "h11"] = "auto"
    body_timeout_s: float = 120.0  # an upload body must arrive within this
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # ---- operations (issue 15): logs and Prometheus metrics
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with request ids
    log_requests: bool = True  # one fedslim.access line per request
    # GET /metrics answers the admin token or this one: a scraper given it can read counters
    # and nothing else (the admin token would let it create and stop federations)
    metrics_token: SecretStr | None = None
    # ---- per-device enrollment (issue 12)
    max_enrollment_token_s: float = 365 * 86400.0  # the longest expiry a one-time token may have
    max_enrollment_tokens: int = 100_000  # issued and not yet purged: bounds the table
    # an agent that said "not now" (its device policy: battery, time window, temperature)
    # is not sampled for that federation for this long, unless it names its own wait
    not_now_s: float = 60.0

    @model_validator(mode="after")
    def _refuse_placeholder_tokens(self) -> CoordinatorSettings:
        if not self.dev_mode:
            for name in ("admin_token", "enrollment_token", "metrics_token"):
                token = getattr(self, name)
                if token is not None and token.get_secret_value() in PLACEHOLDER_TOKENS:
                    raise ValueError(
                        f"{name} is a placeholder; set FEDSLIM_{name.upper()} to a secret "
                        "(or FEDSLIM_DEV_MODE=1 for local experiments)"
                    )
        return self

    @property
    def shared_enrollment_token(self) -> str | None:
        """The shared enrollment token in force: the one set, else the placeholder in dev mode,
        else None (off)."""
        if self.enrollment_token is not None:
            return self.enrollment_token.get_secret_value()
        return DEV_ENROLLMENT_TOKEN if self.dev_mode else None

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'coordinator.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"
