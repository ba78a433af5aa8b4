"""`LilyLinear`: an `nn.Linear` that adds the active Lily adapters' outputs to its own.

It reuses the wrapped layer's `weight` and `bias` Parameters, so the model's own state-dict keys
do not change, and it keeps the original `nn.Linear` object so `remove_lily` can put it back.
The adapter parameters are owned by a `LilyAdapter` (shared across layers), never by the layer.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .sharing import LayerSlot

MERGE_ERROR = (
    "Lily cannot be merged into the base weights: its up-projection is a mix of experts "
    "B_mix = sum_e p_e(x) B_e whose weights p come from a router applied to each input, so there is no "
    "single weight delta to add to W. Keep the adapter as separate layers (load_lily_weights / "
    "set_lily_scale), or train a LoRA if you need an adapter that can be fused."
)


class SlotAdapter(Protocol):
    """What a layer needs of an adapter (a `LilyAdapter`): whether it is on, and its weighted output added in place."""

    enabled: bool

    def add_to(self, result: torch.Tensor, x: torch.Tensor, slot: LayerSlot, weight: float = 1.0) -> torch.Tensor: ...


class LilyMergeError(NotImplementedError):
    """Raised by every merge/fuse attempt: a Lily update depends on the input."""

    def __init__(self, message: str = MERGE_ERROR) -> None:
        super().__init__(message)


class LilyLinear(nn.Linear):
    """A Linear layer with Lily adapters attached by name; any number of them are active, each with a weight.

    Output: `W x + b + sum_i weight_i * delta_i(x)` over `active_adapters` (name -> weight), each
    adapter routing every sample on its own.
    """

    wraps_linear = True  # the layout (sharing.find_targets) adapts it like the nn.Linear it wraps

    def __init__(self, base_layer: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.weight = base_layer.weight
        self.bias = base_layer.bias
        # Plain attributes (not submodules): the original layer and the adapters are owned elsewhere.
        self.original_layer = _Unregistered(base_layer)
        self.adapters: dict[str, SlotAdapter] = {}
        self.slots: dict[str, LayerSlot] = {}
        self.active_adapters: dict[str, float] = {}

    # No `base_layer` attribute on purpose: peft and diffusers follow `base_layer` chains to find the
    # plain Linear under a wrapper (unload, merge), which would silently drop Lily from a LoRA-wrapped layer.

    def restored_layer(self) -> nn.Linear:
        """The original Linear, pointing at this layer's current weight and bias."""
        base = self.original_layer.value
        base.weight = self.weight
        base.bias = self.bias
        return base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_adapters(F.linear(x, self.weight, self.bias), x)

    def add_adapters(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result + sum_i weight_i * delta_i(x)` over the active, enabled adapters (in place where possible)."""
        for name, weight in self.active_adapters.items():
            adapter = self.adapters[name]
            if adapter.enabled:
                result = adapter.add_to(result, x, self.slots[name], weight)
        return result

    def merge(self, *args: object) -> None:
        raise LilyMergeError()

    def unmerge(self, *args: object) -> None:
        raise LilyMergeError()

    def get_delta_weight(self, *args: object) -> torch.Tensor:
        raise LilyMergeError()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lily_adapters={list(self.adapters)}, active={self.active_adapters!r}"


class _Unregistered:
    """Holds a module without registering it as a child (no duplicate state-dict entries)."""

    def __init__(self, value: nn.Module) -> None:
        self.value = value
