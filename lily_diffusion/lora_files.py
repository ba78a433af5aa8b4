"""The diffusers LoRA weight file: its names, and how to tell one from other safetensors files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes and `load_lora_weights` reads
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"  # the same LoRA in Kohya's key names


def is_lora_file(keys: Iterable[str]) -> bool:
    """True when a file's tensor keys look like a LoRA's (diffusers, peft and Kohya all put 'lora' in them)."""
    return any("lora" in key.lower() for key in keys)


# peft's names of the two LoRA factors and diffusers' names for them in a UNet file
_PEFT_TO_DIFFUSERS_UNET = ((".lora_A.", ".lora.down."), (".lora_B.", ".lora.up."))


def uniform_unet_lora_keys(state_dict: Mapping[str, T]) -> dict[str, T]:
    """The UNet LoRA layers with every factor in diffusers' names (`.lora.down.` / `.lora.up.`).

    `convert_state_dict_to_diffusers` renames only the attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`),
    leaving any other target (`proj_in`, `ff.net.2`, ...) in peft's `.lora_A.` / `.lora_B.`. diffusers'
    `load_lora_weights` converts a UNet's keys only when its first key is not in peft's names, so a file mixing the
    two loads one kind of layer and silently leaves the others untrained. One naming for every key loads them all.
    """
    renamed = {}
    for key, value in state_dict.items():
        for peft_name, diffusers_name in _PEFT_TO_DIFFUSERS_UNET:
            key = key.replace(peft_name, diffusers_name)
        renamed[key] = value
    return renamed
