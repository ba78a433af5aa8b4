"""Which layers Lily adapts and which of them share an A or a B pool.

Targeted layers are grouped by (target name, weight shape); inside a group every `stride_A` consecutive layers
share one down-projection A, the whole group shares one pool of `num_B` up-projection experts B, and every layer has
its own router. The layout is a pure function of the config and the model's module names and shapes: the saver,
the loader and the parameter counter all rebuild it the same way, so files need no index.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from torch import nn

from .config import LilyConfig
from .patterns import PatternMatcher
from .wrappers import is_peft_layer, linear_at

ADAPTERS_ATTRIBUTE = "lily_adapters"  # where add_lily registers the adapters on the model


@dataclass(frozen=True)
class LayerSlot:
    """Where one adapted layer takes its parameters from."""

    path: str
    group: int
    a_index: int
    router_index: int


@dataclass(frozen=True)
class Group:
    """Layers with the same target name and weight shape: one B pool, A shared every stride_A layers."""

    target: str
    out_features: int
    in_features: int
    paths: tuple[str, ...]
    first_a_index: int

    @property
    def key(self) -> str:
        """Readable, order-independent name of the group, e.g. `to_k@640x2048`."""
        return f"{self.target}@{self.out_features}x{self.in_features}"

    def num_A(self, stride_A: int) -> int:
        return math.ceil(len(self.paths) / stride_A)

    def a_leaders(self, stride_A: int) -> tuple[str, ...]:
        """The first layer served by each A of the group (the A is named after it)."""
        return self.paths[::stride_A]


@dataclass(frozen=True)
class LilyLayout:
    """The sharing of one adapter over one model."""

    groups: tuple[Group, ...]
    slots: dict[str, LayerSlot]
    stride_A: int

    @property
    def num_A(self) -> int:
        return sum(group.num_A(self.stride_A) for group in self.groups)

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    def a_leaders(self) -> list[str]:
        """Leader path of every A, in A-index order."""
        return [path for group in self.groups for path in group.a_leaders(self.stride_A)]


def target_name(
    module_path: str, target_modules: Collection[str] | str, matcher: PatternMatcher | None = None
) -> str | None:
    """The target a module path matches, or None.

    For a list: the longest entry the path equals or ends with (as `.entry`), never set order.
    For a regex (full match on the path): the path's final component, where a trailing numeric
    index counts with its parent (`...to_out.0` -> `to_out.0`). Pass a set for many entries, and
    one `matcher` for many paths so that their regex matching shares one time budget.
    """
    if isinstance(target_modules, str):
        if not (matcher or PatternMatcher()).fullmatch("LilyConfig.target_modules", target_modules, module_path):
            return None
        parts = module_path.split(".")
        if len(parts) > 1 and parts[-1].isdigit():
            return ".".join(parts[-2:])
        return parts[-1]
    # the path's dot-suffixes, longest first: the work is bounded by the path, not by the list
    return next((suffix for suffix in _dot_suffixes(module_path) if suffix in target_modules), None)


def is_excluded(
    module_path: str, exclude_modules: Collection[str] | str | None, matcher: PatternMatcher | None = None
) -> bool:
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return (matcher or PatternMatcher()).fullmatch("LilyConfig.exclude_modules", exclude_modules, module_path)
    return any(suffix in exclude_modules for suffix in _dot_suffixes(module_path))


def _dot_suffixes(module_path: str) -> list[str]:
    """`a.b.c` -> [`a.b.c`, `b.c`, `c`]: what the path equals or ends with after a dot."""
    parts = module_path.split(".")
    return [".".join(parts[start:]) for start in range(len(parts))]


def find_targets(model: nn.Module, config: LilyConfig) -> list[tuple[str, str, nn.Linear]]:
    """`(path, target name, base Linear)` for every module the config adapts, in registration order.

    Raises `TypeError` for a matched module that is not an `nn.Linear`, and `ValueError` when
    nothing matches or a regex takes longer than its time budget over all the module names.
    """
    found: list[tuple[str, str, nn.Linear]] = []
    targets, excludes = _lookup(config.target_modules), _lookup(config.exclude_modules)
    matcher = PatternMatcher()
    inside_peft = "\0"  # path prefix of the peft wrapper being walked (its children are its own)
    for path, module in model.named_modules():
        if not path or path.split(".")[0] == ADAPTERS_ATTRIBUTE or path.startswith(inside_peft):
            continue
        if is_peft_layer(module):
            inside_peft = path + "."
        target = target_name(path, targets, matcher)
        if target is None or is_excluded(path, excludes, matcher):
            continue
        linear = linear_at(model, path)  # under a LoRA wrapper: its base layer
        # Exactly nn.Linear (or our wrapper of one, which says so): a subclass with its own forward (quantized, ...)
        # would be silently bypassed by LilyLinear's F.linear.
        if type(linear) is not nn.Linear and not getattr(type(linear), "wraps_linear", False):
            raise TypeError(
                f"Lily can only adapt nn.Linear layers, but target {target!r} matched {path!r} "
                f"of type {type(linear).__name__}{'' if linear is module else ' (under a peft wrapper)'}. "
                "Narrow target_modules or add it to exclude_modules."
            )
        found.append((path, target, linear))
    if not found:
        linear_names = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
        raise ValueError(
            f"LilyConfig.target_modules={config.target_modules!r} matches no module of "
            f"{type(model).__name__}. Some of its Linear layers: {linear_names}."
        )
    return found


def _lookup(entries: list[str] | str | None) -> frozenset[str] | str | None:
    """A regex as is, a list of suffixes as a set (constant-time lookups however long the list)."""
    return entries if entries is None or isinstance(entries, str) else frozenset(entries)


def build_layout(model: nn.Module, config: LilyConfig) -> LilyLayout:
    """Group the targets by (target name, weight shape) and assign A's, B pools and routers."""
    members: dict[tuple[str, int, int], list[str]] = {}
    for path, target, base in find_targets(model, config):
        members.setdefault((target, base.out_features, base.in_features), []).append(path)
    groups: list[Group] = []
    slots: dict[str, LayerSlot] = {}
    a_offset = 0
    for group_index, ((target, out_features, in_features), paths) in enumerate(members.items()):
        group = Group(target, out_features, in_features, tuple(paths), a_offset)
        for position, path in enumerate(paths):
            slots[path] = LayerSlot(path, group_index, a_offset + position // config.stride_A, len(slots))
        a_offset += group.num_A(config.stride_A)
        groups.append(group)
    return LilyLayout(tuple(groups), slots, config.stride_A)
