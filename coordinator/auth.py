"""Who may do what: the admin token, agent tokens (stored as sha256, cached in memory so
a poll costs no database write), enrollment (rate-limited per IP, capped in number) with
one-time expiring enrollment tokens or the shared one, revocation and rotation."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid

from coordinator.errors import BadRequest, Forbidden, TooManyRequests, Unauthorized
from coordinator.protocol import EnrollRequest
from coordinator.ratelimit import RateLimiter
from coordinator.settings import CoordinatorSettings
from coordinator.store import AgentRow, EnrollmentTokenRow, Store

__all__ = ["Auth", "hash_token", "new_secret", "same_secret"]

_PURGE_AFTER_S = 30 * 86400.0  # spent, revoked or expired tokens stay listed this long


def new_secret() -> str:
    """A token (agent, enrollment or admin): 256 random bits, URL-safe. The prefix keeps it
    from starting with "-", which 1 in 64 bare `token_urlsafe` strings do and which a shell
    command line then reads as an option (`--enrollment-token -x…` fails to parse)."""
    return "fs_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same_secret(given: str, secret: str) -> bool:
    """Constant-time comparison that any string from the network can enter (the str form of
    `secrets.compare_digest` raises TypeError on non-ASCII input: a 500 for a stray byte)."""
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), secret.encode("utf-8", "surrogatepass"))


class Auth:
    def __init__(self, settings: CoordinatorSettings, store: Store) -> None:
        self.settings, self.store = settings, store
        self._admin = settings.admin_token.get_secret_value()
        self._cache: dict[str, AgentRow] = {}  # token hash -> agent (revocation and rotation evict)
        self._epoch = 0  # bumped by every eviction
        self._lock = threading.Lock()
        self.enroll_limit = RateLimiter(per_minute=settings.enroll_per_ip_per_minute)
        self.upload_limit = RateLimiter(per_minute=settings.uploads_per_agent_per_minute)
        self.upload_ip_limit = RateLimiter(per_minute=settings.uploads_per_ip_per_minute)
        # last_seen is noted in memory per request and written in one transaction per
        # scheduler tick (`flush_seen`): a poll costs no database write
        self._seen: dict[str, float] = {}
        self._budgets: dict[str, int] = {}  # restated on polls, written with `flush_seen`
        self.budget_of: dict[str, int | None] = {}  # the latest stated budget per agent

    def is_admin(self, token: str | None) -> bool:
        return bool(token) and same_secret(str(token), self._admin)

    def check_admin(self, token: str | None) -> None:
        if not token:
            raise Unauthorized("missing bearer token")
        if self.is_admin(token):
            return
        if self._lookup(token) is not None:
            raise Forbidden("agent tokens cannot use admin endpoints")
        raise Unauthorized("invalid token")

    def cached_agent(self, token: str | None) -> AgentRow | None:
        """The agent for `token` when it is in the memory cache and valid (no I/O: safe
        on the event loop); None means "ask `agent`"."""
        if not token or len(token) > 512:
            return None
        with self._lock:
            agent = self._cache.get(hash_token(token))
            if agent is not None and agent.revoked_at is None:
                self._seen[agent.id] = time.time()
                return agent
        return None

    def agent(self, token: str | None) -> AgentRow:
        if not token:
            raise Unauthorized("missing bearer token")
        agent = self._lookup(token)
        if agent is None:
            if self.is_admin(token):
                raise Forbidden("the admin token is not an agent token")
            raise Unauthorized("invalid agent token")
        if agent.revoked_at is not None:
            raise Unauthorized("agent token revoked")
        with self._lock:
            self._seen[agent.id] = time.time()
        return agent

    def state_budget(self, agent: AgentRow, budget_bytes: int) -> None:
        """An agent restated its training memory budget (bytes) on a poll."""
        with self._lock:
            if self.budget(agent) != budget_bytes:
                self._budgets[agent.id] = budget_bytes
            self.budget_of[agent.id] = budget_bytes

    def budget(self, agent: AgentRow) -> int | None:
        """The agent's budget as last stated (a poll, else its enrollment)."""
        return self.budget_of.get(agent.id, agent.memory_budget_bytes)

    def flush_seen(self) -> None:
        """Write the noted last_seen times and restated budgets (one transaction)."""
        with self._lock:
            seen, self._seen = self._seen, {}
            budgets, self._budgets = self._budgets, {}
        if seen or budgets:
            try:
                with self.store.tx() as conn:
                    if seen:
                        self.store.touch_agents(conn, seen)
                    if budgets:
                        self.store.set_budgets(conn, budgets)
            except Exception:
                with self._lock:
                    self._seen = {**seen, **self._seen}
                    self._budgets = {**budgets, **self._budgets}
                raise

    def _lookup(self, token: str) -> AgentRow | None:
        if len(token) > 512:
            return None
        digest = hash_token(token)
        with self._lock:
            hit, epoch = self._cache.get(digest), self._epoch
        if hit is not None:
            return hit
        with self.store.tx() as conn:
            agent = self.store.agent_by_token_hash(conn, digest)
        if agent is not None:
            with self._lock:
                if epoch == self._epoch:  # else a revoke or rotation ran meanwhile: this row may be stale
                    self._cache[digest] = agent
        return agent

    def enroll(self, req: EnrollRequest, client_ip: str) -> tuple[str, str]:
        wait = self.enroll_limit.take(client_ip, time.monotonic())
        if wait:
            raise TooManyRequests(f"too many enrollments from {client_ip}; retry in {wait:.0f} s", retry_after=wait)
        shared = self.settings.shared_enrollment_token
        one_time = not (shared is not None and same_secret(req.enrollment_token, shared))
        agent_id, token = uuid.uuid4().hex[:16], new_secret()
        now = time.time()
        info = {"memory_budget_bytes": req.memory_budget_bytes, "platform": req.platform, "ip": client_ip}
        with self.store.tx() as conn:
            # spent in the transaction that adds the agent: a failure below un-spends it
            if one_time and not self.store.spend_enrollment_token(conn, hash_token(req.enrollment_token), now, agent_id):
                # one answer for unknown, spent, expired and revoked: a guesser learns nothing
                raise Unauthorized("invalid enrollment token (unknown, already used, expired or revoked)")
            if self.store.count_agents(conn) >= self.settings.max_agents:
                raise Forbidden(f"the coordinator holds its maximum of {self.settings.max_agents} agents")
            self.store.add_agent(conn, AgentRow(agent_id, req.name, hash_token(token), now, now, info,
                                                memory_budget_bytes=req.memory_budget_bytes))
        return agent_id, token

    # ------------------------------------------------------------------ one-time enrollment tokens
    def issue_enrollment_token(self, expires_in_s: float, name: str) -> tuple[EnrollmentTokenRow, str]:
        """A new one-time token valid for `expires_in_s` seconds: its row and the secret,
        which is returned this once and stored only as a hash."""
        if not 0 < expires_in_s <= self.settings.max_enrollment_token_s:
            raise BadRequest(f"expiry must be within (0, {self.settings.max_enrollment_token_s:.0f}] seconds")
        now, token = time.time(), new_secret()
        row = EnrollmentTokenRow(uuid.uuid4().hex[:16], name, hash_token(token), now, now + expires_in_s)
        with self.store.tx() as conn:
            if self.store.count_enrollment_tokens(conn) >= self.settings.max_enrollment_tokens:
                self.store.purge_enrollment_tokens(conn, now - _PURGE_AFTER_S)
                if self.store.count_enrollment_tokens(conn) >= self.settings.max_enrollment_tokens:
                    raise Forbidden(f"{self.settings.max_enrollment_tokens} enrollment tokens are outstanding; "
                                    "revoke some first")
            self.store.add_enrollment_token(conn, row)
        return row, token

    def enrollment_tokens(self) -> list[EnrollmentTokenRow]:
        with self.store.tx() as conn:
            return self.store.list_enrollment_tokens(conn)

    def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenRow | None:
        with self.store.tx() as conn:
            self.store.revoke_enrollment_token(conn, token_id, time.time())
            return self.store.get_enrollment_token(conn, token_id)

    def rotate(self, agent_id: str) -> str | None:
        """A new token for a (not revoked) agent, returned this once; the old one stops
        authenticating at once (the cache forgets it). None: no such agent."""
        token = new_secret()
        with self.store.tx() as conn:
            agent = self.store.get_agent(conn, agent_id)
            if agent is None:
                return None
            if agent.revoked_at is not None:
                raise Forbidden(f"agent {agent_id} is revoked; enroll the device again")
            self.store.set_agent_token(conn, agent_id, hash_token(token))
        self._forget(agent_id)
        return token

    def _forget(self, agent_id: str) -> None:
        with self._lock:
            self._cache = {k: a for k, a in self._cache.items() if a.id != agent_id}
            self._epoch += 1

    def revoke(self, agent_id: str) -> AgentRow | None:
        with self.store.tx() as conn:
            agent = self.store.get_agent(conn, agent_id)
            if agent is None:
                return None
            if agent.revoked_at is None:
                self.store.revoke_agent(conn, agent_id, time.time())
            agent = self.store.get_agent(conn, agent_id)
        self._forget(agent_id)
        return agent

    def check_upload_rate(self, agent: AgentRow, client_ip: str) -> None:
        now = time.monotonic()
        wait = self.upload_ip_limit.take(client_ip, now)
        if wait:
            raise TooManyRequests(f"too many uploads from {client_ip}; retry in {wait:.0f} s", retry_after=wait)
        wait = self.upload_limit.take(agent.id, now)
        if wait:
            raise TooManyRequests(f"agent {agent.id} uploads too often; retry in {wait:.0f} s", retry_after=wait)
