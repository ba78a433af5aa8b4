"""The diffusers LoRA weight file: its names, and how to tell one from other safetensors files."""

from __future__ import annotations

from collections.abc import Iterable

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes and `load_lora_weights` reads
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"  # the same LoRA in Kohya's key names


def is_lora_file(keys: Iterable[str]) -> bool:
    """True when a file's tensor keys look like a LoRA's (diffusers, peft and Kohya all put 'lora' in them)."""
    return any("lora" in key.lower() for key in keys)
