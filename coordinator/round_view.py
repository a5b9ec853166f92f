"""The round in flight, read from the store: what the dashboard's live view and the
operator CLI's `watch` show (received / expected, deadline, who has not answered).

Read only and from durable state, so it answers the same on any API replica and after a
restart; it takes no service lock, so a slow round close never blocks it.
"""

from __future__ import annotations

from coordinator.protocol import FederationStatus, RoundInFlight
from coordinator.store import FederationRow, Store

__all__ = ["round_in_flight"]

_ACTIVE = (FederationStatus.running.value, FederationStatus.paused.value)


def round_in_flight(store: Store, fed: FederationRow, now: float) -> RoundInFlight:
    """`fed`'s open round as of `now` (unix seconds); `round` None when none is open."""
    cfg = fed.config
    view = RoundInFlight(federation_id=fed.id, status=FederationStatus(fed.status), rounds=int(cfg["rounds"]),
                         completed_rounds=fed.current_round, min_clients=int(cfg.get("min_clients", 0)),
                         server_time=now)
    if fed.status not in _ACTIVE:
        return view
    with store.tx() as conn:
        row = store.get_round(conn, fed.id, fed.current_round + 1)
        if row is None or row.status != "open":
            return view
        uploaded = {u.agent_id for u in store.list_updates(conn, fed.id, row.round, row.attempt)}
        declined = {d["agent_id"] for d in store.list_declines(conn, fed.id, row.round, row.attempt)}
    return view.model_copy(update={
        "round": row.round, "attempt": row.attempt, "expected": len(row.selected), "received": len(uploaded),
        "declined": len(declined), "opened_at": row.opened_at, "deadline": row.deadline,
        "seconds_left": max(0.0, row.deadline - now),
        "waiting_for": [a for a in row.selected if a not in uploaded and a not in declined],
    })
