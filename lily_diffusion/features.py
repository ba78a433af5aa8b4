"""Lily under diffusers' pipeline features: the LoRA scale of a call, fused q/k/v projections, offloading.

Each is handled where diffusers itself handles LoRA, so Lily and LoRA follow the same rules:

- `cross_attention_kwargs={"scale": s}`: diffusers scales LoRA by `s` for one UNet forward
  (`apply_lora_scale`) and for the text encoders inside `encode_prompt(lora_scale=s)`. Lily reads
  the same value at the same two places (`call_scale_of`, `follow_lora_scale`).
- `fuse_qkv_projections()`: the fused processor calls `attn.to_qkv` / `attn.to_kv` instead of
  `to_q`/`to_k`/`to_v`; `LilyFusedLinear` adds each part's Lily output to its slice of the fused one.
- Sequential CPU offload (accelerate `AlignDevicesHook`s): the hooks only fire around a module's own
  forward, and the adapter's parameter lists are never called; `onload`/`offload` fire them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_multiplier
from .layer import LilyLinear
from .wrappers import linear_at

if TYPE_CHECKING:
    from .adapter import LilyAdapter

logger = logging.getLogger(__name__)

SCALE_KWARGS = ("cross_attention_kwargs", "attention_kwargs", "joint_attention_kwargs")
FUSED_PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}
_FOLLOWING_ATTRIBUTE = "_lily_follows_lora_scale"


def call_scale_of(kwargs: Mapping[str, Any]) -> float | None:
    """The LoRA scale a diffusers model forward takes from its attention kwargs (None when there is none)."""
    for name in SCALE_KWARGS:
        attention_kwargs = kwargs.get(name)
        if isinstance(attention_kwargs, Mapping) and "scale" in attention_kwargs:
            return check_multiplier(f"{name}['scale']", attention_kwargs["scale"])
    return None


def follow_lora_scale(pipe: object, text_encoders: Iterable[nn.Module]) -> None:
    """Scale the text encoders' Lily adapters by the `lora_scale` of `pipe.encode_prompt`, like LoRA.

    diffusers passes `cross_attention_kwargs["scale"]` to `encode_prompt(lora_scale=...)`, which
    scales the text encoders' LoRA layers for the call; the pipeline's `encode_prompt` is wrapped
    once (on the instance) to do the same for Lily. Pipelines without `encode_prompt` are left alone.
    """
    encode_prompt = getattr(pipe, "encode_prompt", None)
    if encode_prompt is None or getattr(encode_prompt, _FOLLOWING_ATTRIBUTE, False):
        return
    encoders = [encoder for encoder in text_encoders if encoder is not None]

    @functools.wraps(encode_prompt)
    def scaled_encode_prompt(*args: Any, **kwargs: Any) -> Any:
        from .adapter import lily_adapters  # the adapter module imports this one

        lora_scale = kwargs.get("lora_scale")
        adapters = [a for e in encoders for a in lily_adapters(e).values()] if lora_scale is not None else []
        for adapter in adapters:
            adapter.call_scale = check_multiplier("lora_scale (cross_attention_kwargs['scale'])", lora_scale)
        try:
            return encode_prompt(*args, **kwargs)
        finally:
            for adapter in adapters:
                adapter.call_scale = 1.0

    setattr(scaled_encode_prompt, _FOLLOWING_ATTRIBUTE, True)
    pipe.encode_prompt = scaled_encode_prompt


class LilyFusedLinear(nn.Linear):
    """A fused `to_qkv`/`to_kv` Linear that adds each part's Lily output to its slice of the fused output.

    It reuses the fused layer's weight and bias (state-dict keys unchanged). The parts are read from
    the attention module at every call, so adapters loaded, stacked or removed later are followed.
    """

    def __init__(self, fused: nn.Linear, attention: nn.Module, parts: tuple[str, ...]) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = fused.in_features, fused.out_features
        self.weight, self.bias = fused.weight, fused.bias
        self.attention_ref = _Unregistered(attention)
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        layers = [linear_at(self.attention_ref.value, part) for part in self.parts]
        if not any(isinstance(layer, LilyLinear) and layer.active_adapters for layer in layers):
            return result
        pieces = result.split([layer.out_features for layer in layers], dim=-1)
        return torch.cat(
            [
                layer.add_adapters(piece.contiguous(), x) if isinstance(layer, LilyLinear) else piece
                for layer, piece in zip(layers, pieces, strict=True)
            ],
            dim=-1,
        )


def wrap_fused_projections(attention_modules: Iterable[nn.Module]) -> None:
    """Give every fused `to_qkv`/`to_kv` of these attention modules Lily's parts (idempotent)."""
    for attention in attention_modules:
        for fused_name, parts in FUSED_PARTS.items():
            fused = getattr(attention, fused_name, None)
            if type(fused) is not nn.Linear or not all(hasattr(attention, part) for part in parts):
                continue
            if sum(linear_at(attention, part).out_features for part in parts) != fused.out_features:
                raise ValueError(
                    f"Cannot add Lily to the fused {fused_name} of {type(attention).__name__}: its width "
                    f"{fused.out_features} is not that of {'+'.join(parts)}; call unfuse_qkv_projections() first."
                )
            setattr(attention, fused_name, LilyFusedLinear(fused, attention, parts))
            logger.debug("Lily follows the fused %s of %s.", fused_name, type(attention).__name__)


def attention_parents(model: nn.Module, paths: Iterable[str]) -> list[nn.Module]:
    """The modules holding adapted q/k/v projections (those `fuse_projections` can fuse), each once."""
    parents: dict[int, nn.Module] = {}
    names = {part for parts in FUSED_PARTS.values() for part in parts}
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        if name in names and parent_path:
            parent = model.get_submodule(parent_path)
            if hasattr(parent, "fuse_projections"):
                parents[id(parent)] = parent
    return list(parents.values())


def offload_hooks(adapter: LilyAdapter) -> list[tuple[nn.Module, Any]]:
    """accelerate's offload hooks on the adapter's parameter lists (sequential CPU offload), if any."""
    return [
        (module, module._hf_hook)
        for module in adapter.modules()
        if getattr(getattr(module, "_hf_hook", None), "offload", False)
    ]


def onload(hooks: list[tuple[nn.Module, Any]]) -> None:
    """Bring offloaded adapter weights to the execution device, as the hook does for a called module."""
    for module, hook in hooks:
        hook.pre_forward(module)


def offload(hooks: list[tuple[nn.Module, Any]]) -> None:
    """Send them back to `meta` after the forward, as the hook does."""
    for module, hook in hooks:
        hook.post_forward(module, None)


class _Unregistered:
    """Holds a module without registering it as a child (the attention module owns this layer)."""

    def __init__(self, value: nn.Module) -> None:
        self.value = value
