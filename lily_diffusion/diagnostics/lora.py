"""A LoRA file for comparison: per-layer update `ΔW = scale · up · down`, its singular values and effective rank.

Reads the two layouts diffusers writes (`{component}.{path}.lora.down.weight` / `.lora.up.weight`, and peft's
`.lora_A.weight` / `.lora_B.weight`). `scale` is `alpha / r`: from a `.alpha` tensor when the file has one,
else from diffusers' `lora_adapter_metadata` (`{component}.lora_alpha`, `{component}.r`), else 1. The scale
changes the singular values' size, never the effective rank.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from ..lora_files import LORA_WEIGHT_NAME
from ..serialization import FORMAT, resolve_weights_path
from ..tensor_files import read_safetensors
from .stats import effective_rank, lora_singular_values

logger = logging.getLogger(__name__)

_PAIRS = ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight"))


class LoraFileError(ValueError):
    """A LoRA file `lily-inspect` cannot read as plain `up · down` pairs."""


@dataclass
class LoraLayer:
    """One LoRA layer: `down` `[r, in]`, `up` `[out, r]`, and its `scale` (alpha / r)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraLayerStats:
    key: str  # "component.module path"
    rank: int
    out_features: int
    in_features: int
    effective_rank: float
    singular_values: list[float]


def read_lora_file(path_or_dir: str | os.PathLike[str]) -> dict[str, LoraLayer]:
    """The file's LoRA layers keyed `component.module path`; a one-line `LoraFileError` for anything else."""
    path = resolve_weights_path(path_or_dir, LORA_WEIGHT_NAME, "LoRA")
    metadata, tensors = read_safetensors(path, LoraFileError)
    if metadata.get("format") == FORMAT:
        raise LoraFileError(f"{path} is a Lily file, not a LoRA: pass it as the ADAPTER argument.")
    if any("lora_magnitude_vector" in key or key.endswith(".dora_scale") for key in tensors):
        raise LoraFileError(f"{path} is a DoRA file: its update is not up · down, so it has no LoRA spectrum here.")
    layers: dict[str, LoraLayer] = {}
    for key, down in tensors.items():
        pair = next(((d, u) for d, u in _PAIRS if key.endswith(d)), None)
        if pair is None:
            continue
        name = key[: -len(pair[0])]
        up = tensors.get(name + pair[1])
        if up is None or down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraFileError(
                f"{path}: LoRA layer {name} has no matching up/B weight of shape [out, {down.shape[0]}]."
            )
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraFileError(f"{path}: LoRA layer {name} holds non-finite values (NaN or infinity).")
        layers[name] = LoraLayer(down, up, _scale(tensors, metadata, name, down.shape[0]))
    if not layers and any(key.startswith(("lora_unet_", "lora_te")) for key in tensors):
        raise LoraFileError(
            f"{path} is a Kohya-format LoRA; save it in the diffusers layout (peft keys) to inspect it."
        )
    if not layers:
        raise LoraFileError(
            f"{path} holds no LoRA layers (no '.lora.down.weight'/'.lora_A.weight' keys with their up/B pairs)."
        )
    logger.info("Read %d LoRA layers from %s.", len(layers), path)
    return layers


def _scale(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str, rank: int) -> float:
    alpha = tensors.get(name + ".alpha")
    if alpha is not None:
        return float(alpha) / rank
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return 1.0
    component = name.split(".", 1)[0]
    alpha, r = config.get(f"{component}.lora_alpha"), config.get(f"{component}.r")
    if isinstance(alpha, (int, float)) and isinstance(r, int) and r > 0:
        return float(alpha) / r
    return 1.0


def lora_layer_stats(layers: dict[str, LoraLayer]) -> list[LoraLayerStats]:
    """Singular values and effective rank of each layer's update `scale · up · down`."""
    stats = []
    for key, layer in layers.items():
        values = lora_singular_values(layer.down, layer.up, layer.scale)
        stats.append(
            LoraLayerStats(
                key, layer.rank, layer.up.shape[0], layer.down.shape[1], effective_rank(values), values.tolist()
            )
        )
    return stats
