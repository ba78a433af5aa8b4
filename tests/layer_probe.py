"""Record what each adapted layer received and returned during a real forward, to check it layer by layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lily_diffusion.functional import lily_delta as functional_lily_delta
from lily_diffusion.layer import LilyLinear
from lily_diffusion.wrappers import linear_at

Call = tuple[torch.Tensor, torch.Tensor]


@contextmanager
def recorded_layers(model: nn.Module, paths: list[str]) -> Iterator[dict[str, list[Call]]]:
    """`{path: [(input, output), ...]}` of the module at each path (the outermost wrapper) while inside."""
    records: dict[str, list[Call]] = {path: [] for path in paths}
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda _m, args, output, path=path: records[path].append((args[0].detach(), output.detach()))
        )
        for path in paths
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def base_output(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """`W x + b` of the plain Linear at `path` (under any wrapper)."""
    linear = linear_at(model, path)
    return F.linear(x, linear.weight, linear.bias)


def lily_delta(model: nn.Module, path: str, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """One Lily adapter's own output at `path`, computed by the adapter alone (no stacking, no cache)."""
    layer = linear_at(model, path)
    assert isinstance(layer, LilyLinear)
    adapter, slot = layer.adapters[adapter_name], layer.slots[adapter_name]
    with torch.no_grad():
        return functional_lily_delta(
            x,
            adapter.lily_A[slot.a_index],
            adapter.lily_router[slot.router_index],
            adapter.lily_B[slot.group],
            adapter.config.scaling * adapter.scale,
            adapter.config.routing,
        )


def lora_delta(model: nn.Module, path: str, x: torch.Tensor, adapter_name: str = "default") -> torch.Tensor:
    """A peft LoRA layer's own output at `path`: `B(A(x)) * scaling`."""
    layer = model.get_submodule(path)
    with torch.no_grad():
        return layer.lora_B[adapter_name](layer.lora_A[adapter_name](x)) * layer.scaling[adapter_name]
