"""The error a plan raises, and the sizes it speaks in, re-exported from their homes:
parsing in the torch-free `edge_agent.units` (`fedslim-agent infer` uses it too), the
working-set record and its printing with the estimate in `models.memory`."""

from __future__ import annotations

from edge_agent.units import MIB, parse_size
from models.memory import MemoryEstimate, format_size

__all__ = ["MIB", "BudgetExceeded", "MemoryEstimate", "format_size", "parse_size"]


class BudgetExceeded(RuntimeError):
    """Local training does not fit the memory budget, whatever the plan.

    Attributes say what the smallest working set found was, so callers (the agent CLI, the
    API layer) can report it without parsing the message.
    """

    def __init__(self, message: str, *, budget_bytes: int, needed_bytes: int, batch_size: int,
                 frozen: tuple[str, ...]) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.needed_bytes = needed_bytes
        self.batch_size = batch_size
        self.frozen = frozen
