"""`LilyLinear`: an `nn.Linear` that adds the active Lily adapter's output to its own.

It reuses the wrapped layer's `weight` and `bias` Parameters, so the model's own state-dict keys
do not change, and it keeps the original `nn.Linear` object so `remove_lily` can put it back.
The adapter parameters are owned by a `LilyAdapter` (shared across layers), never by the layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .adapter import LilyAdapter
    from .sharing import LayerSlot

MERGE_ERROR = (
    "Lily cannot be merged into the base weights: its up-projection is a mix of experts "
    "B_mix = sum_e p_e(x) B_e whose weights p come from a router applied to each input, so there is no "
    "single weight delta to add to W. Keep the adapter as separate layers (load_lily_weights / "
    "set_lily_scale), or train a LoRA if you need an adapter that can be fused."
)


class LilyMergeError(NotImplementedError):
    """Raised by every merge/fuse attempt: a Lily update depends on the input."""

    def __init__(self, message: str = MERGE_ERROR) -> None:
        super().__init__(message)


class LilyLinear(nn.Linear):
    """A Linear layer with Lily adapters attached by name; one of them (or none) is active."""

    def __init__(self, base_layer: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.weight = base_layer.weight
        self.bias = base_layer.bias
        # Plain attributes (not submodules): the original layer and the adapters are owned elsewhere.
        self.original_layer = _Unregistered(base_layer)
        self.adapters: dict[str, LilyAdapter] = {}
        self.slots: dict[str, LayerSlot] = {}
        self.active_adapter: str | None = None

    @property
    def base_layer(self) -> nn.Linear:
        return self.original_layer.value

    def restored_layer(self) -> nn.Linear:
        """The original Linear, pointing at this layer's current weight and bias."""
        base = self.base_layer
        base.weight = self.weight
        base.bias = self.bias
        return base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        adapter = self.adapters.get(self.active_adapter) if self.active_adapter is not None else None
        if adapter is None or not adapter.enabled:
            return result
        return adapter.add_to(result, x, self.slots[self.active_adapter])

    def merge(self, *args: object) -> None:
        raise LilyMergeError()

    def unmerge(self, *args: object) -> None:
        raise LilyMergeError()

    def get_delta_weight(self, *args: object) -> torch.Tensor:
        raise LilyMergeError()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lily_adapters={list(self.adapters)}, active={self.active_adapter!r}"


class _Unregistered:
    """Holds a module without registering it as a child (no duplicate state-dict entries)."""

    def __init__(self, value: nn.Module) -> None:
        self.value = value
