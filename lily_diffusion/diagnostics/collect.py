"""Expert mixes on real prompts: run a few denoising steps with forward hooks on the Lily layers.

A Lily layer's update `ΔW(x) = scaling · Aᵀ · B_mix(x)` depends on its input only through the expert weights
`p(x)` its router gives to `A x`, so recording `p` per layer, per sample and per call is all the analysis needs.
Classifier-free guidance is off (`guidance_scale=1`): only the conditional branch runs, one sample per prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import lily_adapters
from ..functional import down_project, route
from ..layer import LilyLinear
from ..pipeline import components_of

logger = logging.getLogger(__name__)


@dataclass
class Activations:
    """Expert weights recorded on `prompts`: `mixes[key]` is `[calls, prompts, num_B]` for each Lily layer.

    For UNet layers a call is a denoising step (`timesteps[i]`); a text encoder's layers are called once.
    """

    prompts: list[str]
    timesteps: list[float]
    mixes: dict[str, torch.Tensor]  # "component.module path" -> [calls, prompts, num_B]


def collect_mixes(
    pipe: object,
    prompts: Sequence[str],
    num_inference_steps: int = 4,
    seed: int = 0,
    resolution: int | None = None,
    adapter_name: str = "default",
) -> Activations:
    """Run `pipe(prompts)` for `num_inference_steps` steps (latents only) and record every Lily layer's `p`."""
    records: dict[str, list[torch.Tensor]] = {}
    timesteps: list[float] = []
    handles = []
    for component, model in components_of(pipe).items():
        adapter = lily_adapters(model).get(adapter_name)
        if adapter is None:
            continue
        for path, layer in adapter.layers.items():
            key = f"{component}.{path}"
            records[key] = []
            handles.append(layer.register_forward_hook(_recorder(records[key], adapter_name)))
        if component == "unet":
            handles.append(model.register_forward_pre_hook(_timestep_recorder(timesteps), with_kwargs=True))
    if not records:
        raise ValueError(f"The pipeline has no Lily adapter named {adapter_name!r} to inspect.")
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            pipe(
                prompt=list(prompts),
                num_inference_steps=num_inference_steps,
                guidance_scale=1.0,
                height=resolution,
                width=resolution,
                generator=generator,
                output_type="latent",
            )
    finally:
        for handle in handles:
            handle.remove()
    mixes = {key: torch.stack(calls) for key, calls in records.items() if calls}
    logger.info("Recorded expert mixes of %d layers over %d UNet calls.", len(mixes), len(timesteps))
    return Activations(list(prompts), timesteps, mixes)


def _recorder(calls: list[torch.Tensor], adapter_name: str):
    """A forward hook that appends the layer's expert weights `[batch, num_B]` for this call to `calls`."""

    def hook(layer: LilyLinear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        adapter, slot = layer.adapters[adapter_name], layer.slots[adapter_name]
        x = args[0]
        h = down_project(x, adapter.lily_A[slot.a_index])
        p = route(h, adapter.lily_router[slot.router_index], adapter.config.routing)
        if p.dim() == 1:  # routing="batch" (or an unbatched input): one mix for every sample
            p = p.expand(x.shape[0] if x.dim() > 1 else 1, -1)
        calls.append(p.detach().to("cpu", torch.float32))

    return hook


def _timestep_recorder(timesteps: list[float]):
    def hook(model: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        value = timestep.flatten()[0].item() if isinstance(timestep, torch.Tensor) else timestep
        timesteps.append(float(value) if value is not None else float("nan"))

    return hook
