"""Third-party models, registered by Python entry point and resolved by name.

A distribution declares, in its pyproject.toml,

    [project.entry-points."fedslim.models"]
    tiny_mlp = "my_package.models:TinyMLP"

and the coordinator and every agent that has it installed can build `tiny_mlp`: the
factory is called as `factory(in_channels=, num_classes=, image_size=)` and must return
an `nn.Module`. Only the *name* travels over the network, never code: a name that no
installed distribution registers is an unknown model. Built-in zoo names cannot be taken
over by a plugin (a plugin must not swap `resnet20` under a running federation).

Both sides must build the same structure, so a task carries `structure_fingerprint`:
sha256 over the state_dict's names and shapes of the freshly built model at the
federation's (in_channels, num_classes, image_size), and the providing distribution's
name and version; an agent whose own build differs declines the task with the reason.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "BUILTIN_ORIGIN",
    "ENTRY_POINT_GROUP",
    "Plugin",
    "PluginError",
    "find_plugin",
    "plugin_names",
    "structure_fingerprint",
]

ENTRY_POINT_GROUP = "fedslim.models"
BUILTIN_ORIGIN = "fedslim"  # the origin of zoo models: no distribution version in the hash


class PluginError(ValueError):
    """A plugin that cannot be loaded or does not build an nn.Module; the message names it."""


@dataclass(frozen=True)
class Plugin:
    name: str
    origin: str  # "distribution version", e.g. "fedslim-example-model 0.1.0"
    entry_point: md.EntryPoint

    def load(self) -> Callable[..., nn.Module]:
        try:
            factory = self.entry_point.load()
        except Exception as exc:  # an import error inside someone else's package
            raise PluginError(f"model plugin {self.name!r} ({self.origin}, {self.entry_point.value}) "
                              f"failed to load: {type(exc).__name__}: {exc}") from exc
        if not callable(factory):
            raise PluginError(f"model plugin {self.name!r} ({self.origin}): {self.entry_point.value} is not callable")
        return factory  # type: ignore[no-any-return]


def _entry_points() -> list[md.EntryPoint]:
    # read afresh each time (a few ms): installing a plugin needs no restart of a test process
    return list(md.entry_points(group=ENTRY_POINT_GROUP))


def find_plugin(name: str, *, reserved: frozenset[str] = frozenset()) -> Plugin | None:
    """The installed plugin registering `name`, or None; `reserved` names (the zoo's) are
    never resolved to a plugin. Two distributions registering one name are refused."""
    if name in reserved:
        return None
    found = [ep for ep in _entry_points() if ep.name == name]
    if not found:
        return None
    origins = sorted({_origin(ep) for ep in found})
    if len(origins) > 1:
        raise PluginError(f"model {name!r} is registered by several distributions: {', '.join(origins)}")
    return Plugin(name, origins[0], found[0])


def plugin_names(*, reserved: frozenset[str] = frozenset()) -> list[str]:
    return sorted({ep.name for ep in _entry_points()} - reserved)


def _origin(ep: md.EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown-distribution"


def structure_fingerprint(model: nn.Module, origin: str = BUILTIN_ORIGIN) -> str:
    """sha256 hex over the state_dict's (name, shape) pairs in order and `origin`."""
    shapes = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    doc = json.dumps({"origin": origin, "shapes": shapes}, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()
