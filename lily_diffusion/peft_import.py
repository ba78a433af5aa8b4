"""Import a peft Lily adapter folder (`adapter_config.json` + `adapter_model.safetensors`).

peft saves a copy of every shared tensor for each layer that uses it; the import keeps one, after
checking that the copies peft wrote really are equal wherever our layout shares. peft layouts that
cannot be expressed here (a regex target that makes q and v share one group; a group of overlapping
suffixes chosen by set order) fail that check with a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .adapter import LilyAdapter
from .config import LilyConfig
from .patterns import shorten
from .serialization import LilyComponentWeights, LilyFileError, attach_lily_weights, check_finite
from .sharing import LilyLayout, build_layout
from .tensor_files import read_safetensors

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIXES: tuple[str, ...] = ("base_model.model.", "unet.", "text_encoder.", "text_encoder_2.")
PEFT_SUFFIXES = {"A": ".lily_A.weight", "B": ".lily_B.weight", "router": ".lily_router.weight"}


def read_peft_lily(peft_dir: str | os.PathLike[str], model: nn.Module, routing: str = "batch") -> LilyComponentWeights:
    """Convert a peft Lily folder to our config and one-copy tensors for `model` (nothing is changed)."""
    folder = Path(peft_dir)
    config_path, weights_path = folder / PEFT_CONFIG_NAME, folder / PEFT_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a peft adapter folder: it needs {PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME}."
        )
    config = _read_peft_config(config_path, routing)
    _, peft_tensors = read_safetensors(weights_path, LilyFileError)
    check_finite(peft_tensors, str(weights_path))
    try:
        layout = build_layout(model, config)
    except (TypeError, ValueError) as error:
        raise LilyFileError(f"The peft adapter does not fit {type(model).__name__}: {error}") from error
    per_layer = _per_layer_tensors(peft_tensors, layout, weights_path)
    tensors = _deduplicate(per_layer, layout, config)
    return LilyComponentWeights(config, tensors)


def _read_peft_config(config_path: Path, routing: str) -> LilyConfig:
    """Our config from a peft `adapter_config.json`, with a `LilyFileError` for anything unusable."""
    try:
        peft_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise LilyFileError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(peft_config, dict):
        raise LilyFileError(f"{config_path} must hold a JSON object, not {type(peft_config).__name__}.")
    if str(peft_config.get("peft_type", "")).upper() != "LILY":
        raise LilyFileError(
            f"{config_path} is a peft {shorten(peft_config.get('peft_type'))} adapter, not a Lily adapter."
        )
    try:
        return LilyConfig.from_peft(peft_config, routing=routing)
    except (TypeError, ValueError) as error:
        raise LilyFileError(f"{config_path}: invalid Lily config: {error}") from None


def import_peft_lily(
    model: nn.Module, peft_dir: str | os.PathLike[str], adapter_name: str = "default", routing: str = "batch"
) -> LilyAdapter:
    """Add the peft adapter in `peft_dir` to `model` as a Lily adapter (save it with `save_lily_weights`).

    `routing="batch"` (the default) computes exactly what peft computes; pass "sample" to get
    batch-invariant outputs from the same weights.
    """
    return attach_lily_weights(model, read_peft_lily(peft_dir, model, routing), adapter_name, "peft")


def _per_layer_tensors(
    peft_tensors: dict[str, torch.Tensor], layout: LilyLayout, source: Path
) -> dict[tuple[str, str], torch.Tensor]:
    """`(module path, kind) -> tensor` with peft's key prefixes stripped; every layer must be complete."""
    found: dict[tuple[str, str], torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in peft_tensors.items():
        kind = next((k for k, suffix in PEFT_SUFFIXES.items() if key.endswith(suffix)), None)
        path = _module_path(key[: -len(PEFT_SUFFIXES[kind])], layout) if kind else None
        if path is None:
            unexpected.append(key)
        else:
            found[(path, kind)] = tensor
    missing = [
        f"{path}{PEFT_SUFFIXES[kind]}" for path in layout.slots for kind in PEFT_SUFFIXES if (path, kind) not in found
    ]
    if missing or unexpected:
        raise LilyFileError(
            f"{source} does not match this model: missing {len(missing)} ({missing[:3]}), "
            f"unexpected {len(unexpected)} ({unexpected[:3]})."
        )
    return found


def _module_path(key_path: str, layout: LilyLayout) -> str | None:
    candidates = [key_path] + [key_path[len(p) :] for p in PEFT_KEY_PREFIXES if key_path.startswith(p)]
    candidates += [c[len(p) :] for c in candidates[1:] for p in PEFT_KEY_PREFIXES if c.startswith(p)]
    return next((c for c in candidates if c in layout.slots), None)


def _deduplicate(
    per_layer: dict[tuple[str, str], torch.Tensor], layout: LilyLayout, config: LilyConfig
) -> dict[str, torch.Tensor]:
    """Keep one copy per shared tensor, after checking every copy equals it."""
    tensors: dict[str, torch.Tensor] = {}
    for group in layout.groups:
        for start, leader in enumerate(group.a_leaders(layout.stride_A)):
            block = group.paths[start * layout.stride_A : (start + 1) * layout.stride_A]
            tensors[f"{leader}.lily_A.weight"] = _one_copy(per_layer, block, "A")
        pool = _one_copy(per_layer, group.paths, "B")
        tensors[f"{group.key}.lily_B"] = pool.reshape(config.num_B, config.r, pool.shape[-1])
        for path in group.paths:
            tensors[f"{path}.lily_router.weight"] = per_layer[(path, "router")]
    return tensors


def _one_copy(per_layer: dict[tuple[str, str], torch.Tensor], paths: tuple[str, ...], kind: str) -> torch.Tensor:
    first = per_layer[(paths[0], kind)]
    for path in paths[1:]:
        if not torch.equal(per_layer[(path, kind)], first):
            raise LilyFileError(
                f"The peft adapter does not share {kind} the way lily_diffusion does: {path} and {paths[0]} "
                f"hold different {kind} weights although they share one here (target name + shape groups, "
                "stride_A blocks in registration order). peft builds other groups for a regex target_modules "
                "or overlapping suffixes; re-train with a list of suffixes."
            )
    return first
