"""Export a Lily adapter as a peft Lily folder (`adapter_config.json` + `adapter_model.safetensors`).

peft's `PeftModel.from_pretrained(base_model, folder)` loads it. peft stores every shared A and B pool once per
layer that uses it (that is peft's format: the folder is about `num_layers / unique tensors` times our file), and
peft averages the router's expert weights over the whole batch: its outputs equal ours for an adapter with
`routing="batch"`, and for `routing="sample"` only when each sample is run alone (a batch of one).
`import_peft_lily` reads the folder back to the same weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from diffusers.utils.torch_utils import unwrap_module
from peft import LilyConfig as PeftLilyConfig
from torch import nn

from .adapter import get_lily_adapter
from .peft_import import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from .serialization import write_atomically

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def export_peft_lily(model: nn.Module, save_directory: str | os.PathLike[str], adapter_name: str = "default") -> Path:
    """Write `model`'s adapter `adapter_name` as a peft Lily folder; returns the folder.

    peft routes over the whole batch ("batch" semantics): its outputs equal ours for `routing="batch"`, and for
    `routing="sample"` when samples are run one at a time. The config's `scaling` is saved; a runtime
    `set_lily_scale` is not (as with `save_lily_weights`). `target_modules` must be a list of suffixes, none a
    suffix of another: peft groups a regex target or overlapping suffixes differently, so it would compute another
    adapter; those are refused with a `ValueError` before anything is written.
    """
    adapter = get_lily_adapter(unwrap_module(model), adapter_name)
    config = adapter.config
    _check_peft_expressible(config.target_modules)
    tensors: dict[str, torch.Tensor] = {}
    for path, slot in adapter.layout.slots.items():
        pool = adapter.lily_B[slot.group]
        key = f"{PEFT_PREFIX}{path}"
        tensors[f"{key}.lily_A.weight"] = adapter.lily_A[slot.a_index].detach().cpu().clone()
        tensors[f"{key}.lily_B.weight"] = pool.detach().reshape(-1, pool.shape[-1]).cpu().clone()
        tensors[f"{key}.lily_router.weight"] = adapter.lily_router[slot.router_index].detach().cpu().clone()
    peft_config = PeftLilyConfig(**config.to_peft(), inference_mode=True)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(directory))
    write_atomically(directory / PEFT_WEIGHTS_NAME, tensors, {"format": "pt"})
    if config.routing != "batch":
        logger.info("peft routes over the whole batch; its outputs equal this adapter's for one sample at a time.")
    logger.info("Exported Lily adapter %r as a peft folder %s (%s).", adapter_name, directory, PEFT_CONFIG_NAME)
    return directory


def _check_peft_expressible(target_modules: list[str] | str) -> None:
    if isinstance(target_modules, str):
        raise ValueError(
            "export_peft_lily needs target_modules as a list of suffixes: peft groups the layers of a regex target "
            "differently (e.g. to_q and to_v sharing one A), so it would compute another adapter."
        )
    overlapping = sorted(a for a in target_modules for b in target_modules if a != b and a.endswith(f".{b}"))
    if overlapping:
        raise ValueError(
            f"export_peft_lily cannot express target_modules {overlapping} that end with another target: peft "
            "assigns such layers to a group by set order, so it would compute another adapter."
        )
