"""The memory budget of local training: estimate it, measure it, plan within it.

The budget covers the *training working set*: what local training adds on top of the
agent's idle process (interpreter, libraries, loaded data). That working set is

    parameters + gradients + optimizer state + saved activations + input batch + workspace

where saved activations are the tensors autograd keeps for backward, counted exactly with
`torch.autograd.graph.saved_tensors_hooks` on one forward pass at the planned batch size.
That pass runs on the ``meta`` device, so estimating costs no real memory (a device with a
256 MB budget must be able to plan without first spending 400 MB); the counts equal those of
a real CPU pass (a test checks this against the real pass).

`PeakMemoryMeter` measures the same quantity for real: the peak rise of this process's
resident set over its baseline while a block runs. `plan_training` picks the largest batch
that fits, freezes leading layers when no batch does, and raises `BudgetExceeded` saying
what would fit when nothing does.

The allocator matters as much as the model. glibc raises its mmap threshold dynamically,
so after the first freed activation buffers, activations of the next step are carved from
the heap, which fragments and is not returned to the OS: RSS then peaks ~40% above the
live tensors (resnet20, batch 64). `configure_allocator()` fixes the threshold (64 KiB),
so every activation-sized buffer is mmapped and unmapped when freed and RSS tracks the
live working set that the estimate counts. The agent calls it once at start-up; the
estimate (and the budget guarantee) assume it.
"""

from edge_agent.budget.meter import PeakMemoryMeter, configure_allocator, rss_bytes, trim_heap
from edge_agent.budget.plan import TrainingPlan, plan_training, plan_within, shrunk_batch, with_hooks
from edge_agent.budget.sizes import MIB, BudgetExceeded, MemoryEstimate, format_size, parse_size
from models.memory import OPTIMIZER_STATE_SLOTS, OptimizerName, estimate_training_memory, freeze_units

__all__ = [
    "MIB",
    "OPTIMIZER_STATE_SLOTS",
    "BudgetExceeded",
    "MemoryEstimate",
    "OptimizerName",
    "PeakMemoryMeter",
    "TrainingPlan",
    "configure_allocator",
    "estimate_training_memory",
    "format_size",
    "freeze_units",
    "parse_size",
    "plan_training",
    "plan_within",
    "rss_bytes",
    "shrunk_batch",
    "trim_heap",
    "with_hooks",
]
