"""What a federation config may ask of this coordinator, checked at create (before any
weights or data are allocated), so nothing refused later can wedge a round close."""

from __future__ import annotations

from coordinator.protocol import FederationCreate
from coordinator.settings import CoordinatorSettings

__all__ = ["EVAL_BATCH", "check_federation", "model_footprint"]

EVAL_BATCH = 1000  # models.training.evaluate's batch: server-side evaluation memory scales with it
_LIVE_OUTPUTS = 3  # a layer's input, its output and one temporary are alive at once


def model_footprint(cfg: FederationCreate) -> tuple[int, int]:
    """(parameters, largest layer output per sample in elements), on torch's meta device:
    shapes only, no memory, however big the model would be."""
    import torch

    from models.zoo import build_model, default_image_size

    with torch.device("meta"):
        model = build_model(cfg.model, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
                            image_size=cfg.image_size)
        params = sum(p.numel() for p in model.parameters())
        if params > 10**10:  # not even worth a shape pass
            return params, 0
        largest = [0]

        def hook(_m: object, _i: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                largest[0] = max(largest[0], out[0].numel())

        handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
        size = cfg.image_size or default_image_size(cfg.in_channels)
        with torch.no_grad():
            model.eval()(torch.empty(1, cfg.in_channels, size, size))
        for h in handles:
            h.remove()
    return params, largest[0]


def check_federation(cfg: FederationCreate, settings: CoordinatorSettings) -> None:
    """Raise ValueError with the reason when `cfg` asks for more than the caps allow, or
    for a combination that cannot work."""
    if cfg.levels is not None:
        check_levels(cfg)
    if cfg.data.input is not None:
        check_input(cfg)
    if cfg.levels is not None and cfg.data.dataset == "none":
        raise ValueError("width levels re-estimate BN statistics and evaluate per level on the server's data: "
                         "they need data.dataset")
    params, per_sample = model_footprint(cfg)
    if params > settings.max_model_params:
        raise ValueError(f"model {cfg.model!r} at image size {cfg.image_size} has {params:,} parameters; "
                         f"this coordinator accepts at most {settings.max_model_params:,} (max_model_params)")
    eval_bytes = _LIVE_OUTPUTS * per_sample * EVAL_BATCH * 4
    if eval_bytes > settings.max_eval_memory_bytes:
        raise ValueError(f"evaluating {cfg.model!r} at image size {cfg.image_size} would take about "
                         f"{eval_bytes / 2**30:.1f} GiB; the cap is {settings.max_eval_memory_bytes / 2**30:.1f} GiB "
                         "(max_eval_memory_bytes)")


def check_levels(cfg: FederationCreate) -> None:
    """Width levels need a strategy whose agents train plainly (their memory is the
    estimate's whole need; mask strategies' hooks would not fit a slice) and the streaming
    mean (per-coordinate coverage; median and trimmed mean need every client on every
    coordinate)."""
    from strategies.registry import agent_half, build_strategy

    strategy = build_strategy(cfg.strategy.name, cfg.strategy.params)
    if agent_half(cfg.strategy.name) is not None or strategy.fill != "zero" or strategy.wants_second_moment:
        raise ValueError(f"width levels work with strategies whose agents train plainly (fedavg, structured), "
                         f"not {cfg.strategy.name!r}")
    if cfg.aggregation.rule != "mean":
        raise ValueError(f"width levels average each coordinate over the agents that trained it: "
                         f"aggregation rule 'mean' only, not {cfg.aggregation.rule!r}")


def check_input(cfg: FederationCreate) -> None:
    """The input spec must describe what the model takes: one class name per output, and a
    sample of its shape must run through the model (a shape pass on the meta device, so
    any model's own input rule is the judge)."""
    import torch

    from models.zoo import build_model

    spec = cfg.data.input
    assert spec is not None
    if spec.shape[0] != cfg.in_channels or len(spec.classes) != cfg.num_classes:
        raise ValueError(f"data.input has {spec.shape[0]} channels and {len(spec.classes)} classes; the model takes "
                         f"{cfg.in_channels} channels and has {cfg.num_classes} outputs")
    with torch.device("meta"):
        model = build_model(cfg.model, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
                            image_size=cfg.image_size)
        try:
            with torch.no_grad():
                model.eval()(torch.empty(1, *spec.shape))
        except RuntimeError as exc:
            raise ValueError(f"data.input shape {spec.shape} does not fit model {cfg.model!r} at image size "
                             f"{cfg.image_size}: {str(exc)[:200]}") from None
