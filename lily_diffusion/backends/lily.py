"""Lily through lily_diffusion: `add_lily` per component, one `pytorch_lily_weights.safetensors` for all of them."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from diffusers import StableDiffusionXLPipeline
from torch import nn

from ..adapter import add_lily
from ..budget import count_lily_parameters, count_lora_parameters, lily_config_for_lora_budget
from ..config import LilyConfig
from ..messages import first_line, is_out_of_memory
from ..pipeline import load_lily_weights
from ..serialization import FORMAT, WEIGHTS_NAME, LilyFileError, attach_lily_weights, read_lily_file, save_lily_weights
from .base import ADAPTER_NAME, AdapterBackend, AdapterError, AdapterOptions, Targets, copy_targets

logger = logging.getLogger(__name__)

SETTINGS = (("lily_r", "r"), ("lily_stride_A", "stride_A"), ("lily_num_B", "num_B"))
SETTINGS += (("lily_scaling", "scaling"), ("lily_routing", "routing"))


def lily_config(options: AdapterOptions, targets: Targets) -> LilyConfig:
    """A LilyConfig from the --lily_* flags (unset ones keep LilyConfig's defaults); `targets`: suffixes or a regex."""
    values: dict[str, object] = {"target_modules": copy_targets(targets)}
    values.update({name: getattr(options, flag) for flag, name in SETTINGS if getattr(options, flag) is not None})
    try:
        return LilyConfig(**values)
    except (ValueError, TypeError) as err:
        raise AdapterError(f"invalid Lily settings: {err}") from err


class LilyBackend(AdapterBackend):
    """Lily adapters; --match_lora_budget picks the largest r within a LoRA rank's parameter count."""

    kind = "lily"
    display_name = "Lily (Low-Rank Interconnected Adaptation across Layers)"
    weight_name = WEIGHTS_NAME
    file_names = (WEIGHTS_NAME,)
    setting_flags = tuple(flag for flag, _ in SETTINGS)
    exclusive_flags = ("match_lora_budget",)

    def check(self, options: AdapterOptions) -> None:
        lily_config(options, options.target_modules)

    def config_for(self, model: nn.Module, targets: Targets, options: AdapterOptions) -> LilyConfig:
        """The config `add` uses on `model`: the flags', with r chosen by --match_lora_budget when given."""
        config = lily_config(options, targets)
        if options.match_lora_budget is None:
            return config
        return lily_config_for_lora_budget(model, options.match_lora_budget, config)

    def add(self, model: nn.Module, targets: Targets, options: AdapterOptions, label: str) -> list[nn.Parameter]:
        try:
            config = self.config_for(model, targets, options)
        except (ValueError, TypeError) as err:
            raise AdapterError(f"invalid Lily settings for the {label}: {first_line(err)}") from err
        try:
            if options.match_lora_budget is not None:
                lora_count = count_lora_parameters(model, options.match_lora_budget, config)
                logger.info(
                    f"{label}: Lily r={config.r} fits LoRA rank {options.match_lora_budget} ({lora_count:,} params)"
                )
            adapter = add_lily(model, config, adapter_name=ADAPTER_NAME)
        except (ValueError, TypeError) as err:
            raise AdapterError(f"invalid Lily settings for the {label}: {first_line(err)}") from err
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise AdapterError(
                f"not enough memory for the {label}'s Lily adapter (r={config.r}, num_B={config.num_B}): "
                f"{first_line(err)}"
            ) from err
        parameters = list(adapter.parameters())
        logger.info(f"{label}: Lily adapter with {sum(p.numel() for p in parameters):,} trainable parameters")
        return parameters

    def count_parameters(self, model: nn.Module, targets: Targets, options: AdapterOptions) -> int:
        return count_lily_parameters(model, self.config_for(model, targets, options))

    def save(self, directory: Path, models: Mapping[str, nn.Module]) -> Path:
        return save_lily_weights(directory, **models, adapter_name=ADAPTER_NAME)

    def load_in_place(self, directory: Path, models: Mapping[str, nn.Module]) -> None:
        try:
            stored = read_lily_file(directory)
            for component, model in models.items():
                if component not in stored:
                    raise AdapterError(f"checkpoint {directory} has no Lily weights for the {component}")
                attach_lily_weights(model, stored[component], ADAPTER_NAME, component, replace=False)
        except LilyFileError as err:
            raise AdapterError(f"cannot resume from {directory}: {err}") from err

    def load_into_pipeline(self, pipeline: StableDiffusionXLPipeline, directory: str | os.PathLike[str]) -> None:
        load_lily_weights(pipeline, directory)

    def describe_file(self, path: Path, options: AdapterOptions) -> tuple[int, dict[str, str]]:
        components = read_lily_file(path)
        count = sum(tensor.numel() for weights in components.values() for tensor in weights.tensors.values())
        configs = {name: json.dumps(weights.config.to_dict(), sort_keys=True) for name, weights in components.items()}
        return count, configs

    def load_code(self, load_from: str) -> tuple[str, str]:
        return "from lily_diffusion import load_lily_weights\n", f"load_lily_weights(pipe, {load_from!r})"

    def detect(self, metadata: Mapping[str, str], keys: Sequence[str]) -> bool:
        return metadata.get("format") == FORMAT
