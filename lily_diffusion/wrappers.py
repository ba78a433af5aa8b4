"""Where the Linear that Lily adapts at a module path physically sits, through peft's LoRA wrappers.

A diffusers/peft LoRA replaces `...to_q` with a peft layer whose `base_layer` is the Linear. Lily
keeps the logical path (`...to_q`, so files stay the same with or without LoRA) and wraps the
Linear at the bottom of the `base_layer` chain; when LoRA comes second it wraps our `LilyLinear`,
which is an `nn.Linear`. Either way the layer computes `W x + lily(x) + lora(x)`.
"""

from __future__ import annotations

from torch import nn

try:  # peft is a dependency, but keep the library importable without it
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:  # pragma: no cover
    BaseTunerLayer = None


def is_peft_layer(module: nn.Module) -> bool:
    """True for a peft tuner layer (a LoRA wrapper and the like)."""
    return BaseTunerLayer is not None and isinstance(module, BaseTunerLayer)


def linear_slot(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """`(parent, attribute)` holding the layer Lily adapts at `path`: the module, or the one under peft wrappers."""
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, attribute)
    while is_peft_layer(module) and isinstance(getattr(module, "base_layer", None), nn.Module):
        parent, attribute, module = module, "base_layer", module.base_layer
    return parent, attribute


def linear_at(model: nn.Module, path: str) -> nn.Module:
    """The layer Lily adapts at `path` (see `linear_slot`)."""
    parent, attribute = linear_slot(model, path)
    return getattr(parent, attribute)


def replace_linear(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` where the adapted layer of `path` sits (inside a peft wrapper when there is one)."""
    parent, attribute = linear_slot(model, path)
    setattr(parent, attribute, module)
