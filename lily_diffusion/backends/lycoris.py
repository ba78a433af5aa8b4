"""LoKr and LoHa through peft (`LoKrConfig`, `LoHaConfig`), in lily_diffusion's LoKr/LoHa file (`lycoris_files`).

They read `--rank` and `--lora_alpha` (peft's `r` and `alpha`; alpha defaults to the rank) like LoRA, and
`--match_lora_budget RANK` picks the largest rank within a rank-RANK LoRA's parameter count. LoKr also reads
`--lokr_decompose_factor` and `--lokr_decompose_both`. peft's LoKr/LoHa have no plain input dropout, so
`--lora_dropout` is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from diffusers import StableDiffusionXLPipeline
from peft import LoHaConfig, LoKrConfig, set_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from ..lycoris_files import (
    WEIGHT_NAMES,
    LycorisFileError,
    config_fields,
    file_kind,
    load_lycoris_weights,
    read_lycoris_file,
    save_lycoris_weights,
)
from .base import ADAPTER_NAME, AdapterError, AdapterOptions, Targets, copy_targets
from .peft_kinds import PeftAdapterBackend


class LycorisBackend(PeftAdapterBackend):
    """A peft LyCORIS adapter (LoKr or LoHa) on the same layers as LoRA, saved in one file with its configs."""

    config_type: ClassVar[type[LoKrConfig] | type[LoHaConfig]]
    lora_settings = ("rank", "lora_alpha")
    exclusive_flags: ClassVar[tuple[str, ...]] = ("match_lora_budget",)

    def config_at(self, options: AdapterOptions, targets: Targets, rank: int) -> LoKrConfig | LoHaConfig:
        """The peft config at `rank` (alpha: --lora_alpha, else the rank, so the update's scale alpha/r is 1)."""
        alpha = options.lora_alpha if options.lora_alpha is not None else rank
        return self.config_type(r=rank, alpha=alpha, target_modules=copy_targets(targets), **self.extra(options))

    def extra(self, options: AdapterOptions) -> dict[str, object]:
        """Config fields only this kind has."""
        return {}

    def save(self, directory: Path, models: Mapping[str, nn.Module]) -> Path:
        return save_lycoris_weights(directory, self.kind, models, ADAPTER_NAME)

    def load_in_place(self, directory: Path, models: Mapping[str, nn.Module]) -> None:
        try:
            kind, components = read_lycoris_file(directory / self.weight_name)
        except LycorisFileError as err:
            raise AdapterError(f"cannot resume from {directory}: {err}") from err
        for component, model in models.items():
            part = components.get(component)
            if kind != self.kind or part is None:
                raise AdapterError(f"checkpoint {directory} has no {self.display_name} weights for the {component}")
            if config_fields(part.config, self.kind) != config_fields(model.peft_config[ADAPTER_NAME], self.kind):
                raise AdapterError(f"checkpoint {directory} was saved with another {self.display_name} config")
            result = set_peft_model_state_dict(model, part.tensors, adapter_name=ADAPTER_NAME)
            if getattr(result, "unexpected_keys", None):
                raise AdapterError(
                    f"checkpoint {directory} does not fit the {component}: {result.unexpected_keys[:3]}"
                )

    def load_into_pipeline(self, pipeline: StableDiffusionXLPipeline, directory: str | os.PathLike[str]) -> None:
        load_lycoris_weights(pipeline, directory)

    def detect(self, metadata: Mapping[str, str], keys: Sequence[str]) -> bool:
        return file_kind(metadata) == self.kind

    def describe_file(self, path: Path, options: AdapterOptions) -> tuple[int, dict[str, str]]:
        _, components = read_lycoris_file(path)
        count = sum(tensor.numel() for part in components.values() for tensor in part.tensors.values())
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        configs = {name: json.dumps(json.loads(metadata[f"config.{name}"]), sort_keys=True) for name in components}
        return count, configs

    def load_code(self, load_from: str) -> tuple[str, str]:
        return "from lily_diffusion import load_lycoris_weights\n", f"load_lycoris_weights(pipe, {load_from!r})"


class LokrBackend(LycorisBackend):
    """peft LoKr (low-rank Kronecker product)."""

    kind = "lokr"
    display_name = "LoKr"
    config_type = LoKrConfig
    weight_name = WEIGHT_NAMES["lokr"]
    file_names = (WEIGHT_NAMES["lokr"],)
    exclusive_flags = ("match_lora_budget", "lokr_decompose_factor", "lokr_decompose_both")

    def extra(self, options: AdapterOptions) -> dict[str, object]:
        return {"decompose_factor": options.lokr_decompose_factor, "decompose_both": options.lokr_decompose_both}


class LohaBackend(LycorisBackend):
    """peft LoHa (low-rank Hadamard product: two low-rank pairs per layer)."""

    kind = "loha"
    display_name = "LoHa"
    config_type = LoHaConfig
    weight_name = WEIGHT_NAMES["loha"]
    file_names = (WEIGHT_NAMES["loha"],)
