"""The wire schemas of the REST API (pydantic only: no FastAPI, no I/O).

Shared by the coordinator and the edge agent. Binary payloads (models, updates) are not
here: they travel as `sparse_kernels` codec bytes; these schemas carry everything else.
Split by purpose, as the FastAPI full-stack template does: *Create for input, *Public for
output.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "API_PREFIX",
    "AgentPublic",
    "AggregationSpec",
    "MAX_ID",
    "MAX_SEED",
    "DataSpec",
    "EnrollRequest",
    "EnrollResponse",
    "EnrollmentTokenCreate",
    "EnrollmentTokenIssued",
    "EnrollmentTokenPublic",
    "FederationCreate",
    "FederationPublic",
    "FederationStatus",
    "InputSpec",
    "RoundInFlight",
    "StrategySpec",
    "Task",
    "TaskDecline",
    "TaskLevel",
    "LevelsSpec",
    "MASK_HEADER",
    "NEEDS_HEADER",
    "TrainingConfig",
    "UpdateReceipt",
    "UpdateReport",
]

API_PREFIX = "/v1"
# Header carrying the agent's JSON `UpdateReport` alongside the binary update body.
REPORT_HEADER = "X-Fedslim-Report"
VERSION_HEADER = "X-Fedslim-Version"
KIND_HEADER = "X-Fedslim-Kind"
RESHAPE_HEADER = "X-Fedslim-Reshape"  # "1": slice your weights with .../reshape before the patch
# On model and patch downloads: the sha256 of that version's mask artifact (.../mask), ""
# when it has none; an agent applies w⊙m after the patch (so patches chain without a task)
MASK_HEADER = "X-Fedslim-Mask"
# On a task poll answered 204: JSON {federation: bytes} for the federations whose width
# levels all need more training memory than the agent's budget (the smallest level's need)
NEEDS_HEADER = "X-Fedslim-Needs"

ValueEncoding = Literal["fp32", "fp16", "int8", "ternary"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingConfig(_Strict):
    """Local training and compression settings sent to agents with every task."""

    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    # A memory budget may force a batch below batch_size; the learning rate then shrinks in
    # proportion (the linear scaling rule, Goyal et al. 2017), so a small device takes more,
    # smaller steps instead of diverging (bench.budgets: batch 8 at lr 0.05 / momentum 0.9
    # blew up round 1 of the yardstick and cost 30 points of accuracy)
    scale_lr_with_batch: bool = True
    # Fraction of coordinates each agent uploads (top-k with error feedback); 1.0 = dense.
    upload_density: float = Field(1.0, gt=0, le=1)
    upload_values: ValueEncoding = "fp32"
    # Top-k over each tensor (every layer sends its share) or over the whole model (the
    # layers that moved most send more).
    upload_scope: Literal["per_tensor", "global"] = "per_tensor"
    # Adaptive per-round density: each agent sends the fewest coordinates of its change
    # (+ residual) that carry this share of its squared L2 norm, never more than
    # upload_density; a round that moved few weights sends few. None: always upload_density.
    upload_energy: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    # Local gradient clipping (DGC, Lin et al. 2018): each step's gradient L2 norm is cut
    # to this before the optimiser step, so a few large steps cannot dominate a round's
    # delta (and the top-k that is sent of it). None: no clipping.
    clip_grad_norm: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False)
    max_steps: int | None = Field(None, ge=1, description="cap on local steps (tests, smoke runs)")


class StrategySpec(_Strict):
    name: str = Field("fedavg", min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, max_length=64)


_ClassName = Annotated[str, Field(min_length=1, max_length=100)]
MAX_INPUT_VALUES = 4 * 512 * 512


class InputSpec(_Strict):
    """What one sample looks like to the model, so that devices with their own files
    (`fedslim-agent run --data`) can map them: labels by class name (index i of `classes`
    is the model's output i), resized to `shape`, normalised as (x/255 - mean)/std per
    channel for 8-bit images and (x - mean)/std for numeric features."""

    shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=3, max_length=3, description="[C, H, W]")
    classes: list[_ClassName] = Field(min_length=2, max_length=1000)
    mean: list[Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.5], min_length=1, max_length=4096)
    std: list[Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.25], min_length=1, max_length=4096)

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        c, h, w = self.shape
        if c * h * w > MAX_INPUT_VALUES:  # as large as image_size allows (4 × 512 × 512), no more
            raise ValueError(f"shape {self.shape} has {c * h * w:,} values per sample; at most {MAX_INPUT_VALUES:,}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.shape[0]):
                raise ValueError(f"{name} needs 1 or C = {self.shape[0]} values, got {len(values)}")
        return self


class DataSpec(_Strict):
    """What the federation trains on. Agents bring their own local data; the coordinator
    uses `dataset` for server-side evaluation on its test split ("none": it has no data,
    the usual real case, and the agents evaluate: `evaluation`)."""

    dataset: Literal["fashion_mnist", "cifar10", "synthetic", "none"] = "fashion_mnist"
    data_dir: str | None = Field(None, max_length=4096)
    partition: str = Field("dirichlet:0.5", max_length=100)
    eval_samples: int | None = Field(None, ge=1, le=10**7, description="evaluate on the first N test samples")
    input: InputSpec | None = Field(None, description="the input spec agents map their local files to")
    evaluation: Literal["auto", "server", "federated", "both"] = Field(
        "auto", description="server: the coordinator's test split; federated: each agent evaluates the global model "
        "it received on its held-out split and the round reports the sample-weighted mean (Flower's evaluate); "
        "auto: server when there is a dataset, else federated",
    )

    @field_validator("evaluation")
    @classmethod
    def _needs_data(cls, v: str, info: Any) -> str:
        if v in ("server", "both") and info.data.get("dataset") == "none":
            raise ValueError(f"evaluation {v!r} needs a server-side dataset (data.dataset is 'none')")
        return v

    def evaluation_mode(self) -> Literal["server", "federated", "both"]:
        if self.evaluation == "auto":
            return "federated" if self.dataset == "none" else "server"
        return self.evaluation


MAX_ID = 2**31 - 1  # round numbers and model versions (SQL INTEGER everywhere)
MAX_SEED = 2**32 - 1


class AggregationSpec(_Strict):
    """How the round's accepted updates become one mean delta, and what one upload may
    weigh. The defaults keep the mean exact for honest agents and bound what one hostile
    agent can do: an update's L2 norm is clipped to `clip_norm` (or, when that is unset,
    to `clip_relative` x max(1, ||global weights||)), and its weight to `max_num_samples`."""

    rule: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="mean: sample-weighted FedAvg (streaming, O(model) memory); median / "
        "trimmed_mean: coordinate-wise and unweighted (Yin et al. 2018), O(clients x model) at close",
    )
    trim_ratio: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: fraction cut at each end")
    clip_norm: float | None = Field(None, gt=0, le=1e9, description="absolute L2 clip of each update")
    clip_relative: float | None = Field(
        3.0, gt=0, le=1e6, description="clip to this multiple of max(1, ||w||) when clip_norm is unset; "
        "null with clip_norm unset turns clipping off",
    )
    max_num_samples: int = Field(100_000, ge=1, le=10**9, description="an update's weight is capped here")
    weighting: Literal["samples", "uniform"] = "samples"


# "auto": every width on this grid is a level; each agent gets the widest its budget fits,
# so the levels in use follow the budgets the coordinator sees
AUTO_WIDTHS: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
MAX_LEVELS = len(AUTO_WIDTHS)


class LevelsSpec(_Strict):
    """Width levels: nested structured sub-models of the global model (`pruning.levels`).
    Each sampled agent trains the widest level whose estimated training working set at
    `min_batch` fits the memory budget it stated; each coordinate is averaged over the
    agents that trained it."""

    widths: list[float] | Literal["auto"] = Field(
        default_factory=lambda: [1.0, 0.75, 0.5, 0.25],
        description="fractions of each layer's channels, one per level, or 'auto'; without 1.0 no agent trains "
        "the whole model (every agent trains at most the widest level: uniform structured pruning)",
    )
    # importance is the default: the best of the three in bench.budgets (docs/BENCHMARKS.md)
    rule: Literal["first", "importance", "rolling"] = Field(
        "importance", description="importance: the k largest-L2 channels of the current global model "
        "(FjORD-style ordering; the default); first: first-k channels (HeteroFL); rolling: a window moving "
        "one channel per round (FedRolex)",
    )
    min_batch: int = Field(8, ge=1, le=4096, description="the smallest batch a level must fit at")
    bn_calibration_samples: int = Field(
        512, ge=0, le=10_000, description="training samples the server re-estimates each level's BN statistics on "
        "before evaluating it (0: evaluate with the averaged statistics)",
    )

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[float] | str) -> list[float] | str:
        if isinstance(v, str):
            return v
        if not 1 <= len(v) <= MAX_LEVELS:
            raise ValueError(f"give 1 to {MAX_LEVELS} widths")
        if any(not 0.01 <= w <= 1 for w in v):
            raise ValueError("every width is a fraction in [0.01, 1]")
        return sorted(set(v), reverse=True)

    def width_list(self) -> list[float]:
        return list(AUTO_WIDTHS) if self.widths == "auto" else list(self.widths)


class FederationCreate(_Strict):
    name: str = Field("federation", min_length=1, max_length=100)
    model: str = Field("fedavg_cnn", min_length=1, max_length=64)
    in_channels: int = Field(1, ge=1, le=4)
    num_classes: int = Field(10, ge=2, le=1000)
    image_size: int | None = Field(None, ge=8, le=512)
    data: DataSpec = Field(default_factory=lambda: DataSpec())
    rounds: int = Field(10, ge=1, le=100_000)
    clients_per_round: int = Field(10, ge=1, le=100_000)
    min_clients: int = Field(1, ge=1, le=100_000)
    round_deadline_s: float = Field(300.0, gt=0, le=86_400)
    # A round is re-opened (a new sample) when its deadline passes short of min_clients.
    # None retries as long as it takes (a fleet may be offline for hours); N fails the
    # federation, with the reason, after the N-th attempt (e.g. every client's update is
    # non-finite: retrying cannot help).
    max_round_attempts: int | None = Field(None, ge=1, le=100_000)
    training: TrainingConfig = Field(default_factory=lambda: TrainingConfig())
    strategy: StrategySpec = Field(default_factory=lambda: StrategySpec())
    # Server-side broadcast compression: fraction of coordinates changed per round (the
    # rest is carried in a server residual); 1.0 sends every change exactly.
    download_density: float = Field(1.0, gt=0, le=1)
    download_values: ValueEncoding = "fp32"
    # Adaptive broadcast density, as training.upload_energy is for uploads: the fewest
    # coordinates of the change (+ server residual) carrying this share of its squared
    # norm, download_density at most. None: always download_density.
    download_energy: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    # Density warm-up (DGC): the first N rounds exchange more coordinates both ways,
    # density falling geometrically from 1 to upload_density / download_density
    # (`sparse_kernels.warmup_density`), while the residuals are largest.
    density_warmup_rounds: int = Field(0, ge=0, le=1000)
    memory_budget_mb: float | None = Field(None, gt=0, le=2**30,
                                           description="agents' training working-set budget in MiB (2^20 bytes)")
    # Uploads whose L2 norm exceeds this are rejected (a cheap defence against blow-ups).
    max_update_norm: float | None = Field(None, gt=0, le=1e9)
    aggregation: AggregationSpec = Field(default_factory=lambda: AggregationSpec())
    levels: LevelsSpec | None = Field(None, description="width levels for agents whose memory cannot hold the model")
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("min_clients")
    @classmethod
    def _min_le_per_round(cls, v: int, info: Any) -> int:
        per_round = info.data.get("clients_per_round")
        if per_round is not None and v > per_round:
            raise ValueError(f"min_clients ({v}) exceeds clients_per_round ({per_round})")
        return v


class FederationStatus(str, Enum):
    created = "created"
    running = "running"
    paused = "paused"
    stopped = "stopped"
    completed = "completed"
    failed = "failed"  # a round could not be closed; `error` says why


class FederationPublic(_Strict):
    id: str
    status: FederationStatus
    config: FederationCreate
    current_round: int  # rounds completed so far
    model_version: int
    created_at: float
    error: str | None = None  # why it failed, or why round closing is backing off


class EnrollRequest(_Strict):
    enrollment_token: str = Field(min_length=1, max_length=512)
    name: str = Field("agent", min_length=1, max_length=100, pattern=r"^[\w.\-]+$")
    memory_budget_bytes: int | None = Field(None, gt=0, le=2**50)
    platform: str = Field("", max_length=200)


class EnrollResponse(_Strict):
    agent_id: str
    agent_token: str


class EnrollmentTokenCreate(_Strict):
    """A one-time enrollment token for one device: it enrolls once, before it expires."""

    expires_in_s: float = Field(86400.0, gt=0, le=366 * 86400, allow_inf_nan=False)
    name: str = Field("", max_length=100, pattern=r"^[\w.\- ]*$")  # the operator's label for the device


class EnrollmentTokenPublic(_Strict):
    id: str
    name: str
    created_at: float
    expires_at: float
    status: Literal["active", "used", "expired", "revoked"]
    used_at: float | None = None
    agent_id: str | None = None  # the agent its enrollment created


class EnrollmentTokenIssued(EnrollmentTokenPublic):
    token: str  # shown this once: the coordinator keeps only its sha256


class AgentPublic(_Strict):
    id: str
    name: str
    enrolled_at: float
    last_seen: float
    status: str  # online | offline | revoked
    memory_budget_bytes: int | None = None
    # federation -> the smallest budget (bytes) that would fit its task, from the agent's
    # declines or, with width levels, from the smallest level's estimate
    needs_bytes: dict[str, int] = Field(default_factory=dict)
    # federation -> the width of the level it was last given
    widths: dict[str, float] = Field(default_factory=dict)


class TaskLevel(_Strict):
    """One width level of a task: kept channels per tensor and dimension as [start, stop)
    runs (None: the dimension is whole), with the coordinator's estimate of its training
    working set at the federation's `min_batch`."""

    width: float = Field(gt=0, le=1)
    need_bytes: int = Field(ge=0, le=2**50)
    macs: int = Field(ge=0, le=2**62)
    slices: dict[str, list[list[list[int]] | None]] = Field(default_factory=dict, max_length=10_000)


class Task(_Strict):
    """One unit of work for an agent: train round `round` from `model_version`."""

    federation_id: str
    round: int
    kind: Literal["train"] = "train"
    model: str
    in_channels: int
    num_classes: int
    image_size: int | None
    model_version: int
    training: TrainingConfig
    strategy: StrategySpec
    deadline: float  # unix time after which an upload is refused
    memory_budget_mb: float | None = None
    # sha256 of the base model's canonical bytes: an agent that can rebuild them (the
    # seeded initial model) skips the download
    model_sha256: str = ""
    # sha256 of model_version's mask artifact (GET .../models/{version}/mask, sparse_kernels.masks):
    # the strategy's keep-masks, applied after the model download and read by its agent half;
    # "" when the strategy keeps none
    mask_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    seed: int = 0
    download_values: ValueEncoding = "fp32"
    # width levels (widest first) and the one this agent was given: it trains that slice
    # of the model, or a narrower one if its own plan says the given one does not fit
    levels: list[TaskLevel] = Field(default_factory=list, max_length=MAX_LEVELS)
    level: int | None = Field(None, ge=0, lt=MAX_LEVELS)
    # with levels: the global model's tensor shapes (a level agent downloads only its slice
    # from .../models/{version}/levels/{level}?round=R and keeps its residual in these shapes)
    model_shapes: dict[str, list[int]] = Field(default_factory=dict, max_length=10_000)
    # what `model` builds on the coordinator (models.zoo.model_identity): sha256 of the fresh
    # model's state_dict names + shapes and its origin ("fedslim", or a plugin's
    # "distribution version"); an agent whose own build differs declines the task
    model_fingerprint: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    model_origin: str = Field("", max_length=200)
    # the federation's input spec (local data is mapped to it) and whether the agent should
    # evaluate the global model it received on its held-out split before training
    input: InputSpec | None = None
    evaluate: bool = False


class UpdateReport(_Strict):
    """What an agent says about its local work (sent as JSON in REPORT_HEADER)."""

    # every field bounded: a report is folded into metrics arithmetic at the round close
    num_samples: int = Field(ge=1, le=10**9)
    train_loss: float = Field(ge=-1e12, le=1e12, allow_inf_nan=False)
    train_accuracy: float = Field(ge=0, le=1, allow_inf_nan=False)
    train_seconds: float = Field(ge=0, le=1e7, allow_inf_nan=False)
    peak_memory_bytes: int = Field(0, ge=0, le=2**50)
    planned_memory_bytes: int = Field(0, ge=0, le=2**50)
    baseline_memory_bytes: int = Field(0, ge=0, le=2**50)
    batch_size: int = Field(0, ge=0, le=10**6)
    level: int | None = Field(None, ge=0, lt=MAX_LEVELS, description="the width level trained (task.levels)")
    peak_rss_bytes: int = Field(0, ge=0, le=2**50, description="the agent process's peak resident set while training")
    memory_limit_bytes: int | None = Field(None, gt=0, le=2**50, description="the process memory limit it trained under")
    # federated evaluation: the received global model on the agent's held-out split (0: none)
    eval_samples: int = Field(0, ge=0, le=10**9)
    eval_loss: float | None = Field(None, ge=0, le=1e12, allow_inf_nan=False)
    eval_accuracy: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _eval_together(self) -> UpdateReport:
        # all three or none: a mean over reports must not meet half an evaluation
        if not (self.eval_samples > 0) == (self.eval_loss is not None) == (self.eval_accuracy is not None):
            raise ValueError("eval_samples > 0, eval_loss and eval_accuracy go together")
        return self


class TaskDecline(_Strict):
    """An agent that cannot train its task says why, so the round stops waiting for it; with
    `needed_bytes` (the smallest training memory that would fit) the coordinator does not
    sample it again for this federation until it states a budget at least that large."""

    reason: str = Field(min_length=1, max_length=500)
    needed_bytes: int | None = Field(None, gt=0, le=2**50)
    # "not now" (the device's policy: on battery, outside its time window, too hot): without
    # needed_bytes the agent is not sampled for this federation for this long (else the
    # coordinator's `not_now_s`), so the retry samples another device
    retry_after_s: float | None = Field(None, gt=0, le=86400, allow_inf_nan=False)


class UpdateReceipt(_Strict):
    federation_id: str
    round: int
    accepted: bool
    duplicate: bool = False


class RoundInFlight(_Strict):
    """The round a federation is running now, as the dashboard and `watch` show it (read
    only). `round` is None when no round is open (between rounds, or not running)."""

    federation_id: str
    status: FederationStatus
    rounds: int  # the federation's total
    completed_rounds: int
    round: int | None = None
    attempt: int | None = None
    expected: int = 0  # agents selected for this attempt
    received: int = 0  # accepted updates
    declined: int = 0
    min_clients: int = 0
    opened_at: float | None = None
    deadline: float | None = None  # unix seconds
    seconds_left: float | None = None  # deadline - server time (never negative)
    # selected agents that have neither uploaded nor declined; after the deadline, stragglers
    waiting_for: list[str] = Field(default_factory=list, max_length=100_000)
    server_time: float
