"""LoRA (or DoRA) through peft and diffusers: `add_adapter(LoraConfig)`, saved with `save_lora_weights`."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from diffusers import ModelMixin, StableDiffusionXLPipeline
from diffusers.utils import (
    convert_all_state_dict_to_peft,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..budget import count_lora_parameters
from ..config import LilyConfig
from ..lora_files import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, is_lora_file
from ..messages import first_line, is_out_of_memory
from .base import ADAPTER_NAME, AdapterBackend, AdapterError, AdapterOptions, Targets, copy_targets


class LoraBackend(AdapterBackend):
    """peft LoRA; --use_dora trains DoRA, --output_kohya_format adds a Kohya copy of the final file."""

    kind = "lora"
    display_name = "LoRA"
    weight_name = LORA_WEIGHT_NAME
    file_names = (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME)
    takes_lora_settings = True
    exclusive_flags = ("use_dora", "output_kohya_format")

    def add(self, model: nn.Module, targets: Targets, options: AdapterOptions, label: str) -> list[nn.Parameter]:
        config = LoraConfig(
            r=options.rank,
            lora_alpha=options.lora_alpha if options.lora_alpha is not None else options.rank,
            lora_dropout=options.lora_dropout,
            use_dora=options.use_dora,
            init_lora_weights="gaussian",
            target_modules=copy_targets(targets),
        )
        try:
            if isinstance(model, ModelMixin):
                model.add_adapter(config)
            else:  # transformers' add_adapter wants peft >= 0.22 (transformers 5), above every released peft
                inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
                model.peft_config = {ADAPTER_NAME: config}  # as add_adapter records it; the saved metadata reads it
        except (ValueError, TypeError) as err:
            raise AdapterError(f"cannot add LoRA: {first_line(err)}") from err
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise AdapterError(f"not enough memory for a LoRA of rank {options.rank}: {first_line(err)}") from err
        return [p for p in model.parameters() if p.requires_grad]

    def count_parameters(self, model: nn.Module, targets: Targets, options: AdapterOptions) -> int:
        return count_lora_parameters(model, options.rank, LilyConfig(target_modules=copy_targets(targets)))

    def save(self, directory: Path, models: Mapping[str, nn.Module]) -> Path:
        # diffusers writes in place: write into a temporary folder beside it, then rename, so that a failed or
        # interrupted save never leaves half a file under the final name
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".lora-weights-", dir=directory))
        try:
            _save_lora_weights(staging, models)
            os.replace(staging / LORA_WEIGHT_NAME, directory / LORA_WEIGHT_NAME)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory / LORA_WEIGHT_NAME

    def load_in_place(self, directory: Path, models: Mapping[str, nn.Module]) -> None:
        state_dict, _ = StableDiffusionXLPipeline.lora_state_dict(str(directory))
        for component, model in models.items():
            prefix = f"{component}."
            part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if component == "unet":
                part = convert_unet_state_dict_to_peft(part)
            else:
                part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            result = set_peft_model_state_dict(model, part, adapter_name=ADAPTER_NAME)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise AdapterError(
                    f"checkpoint {directory} has unexpected LoRA keys for {component}: {unexpected[:3]}"
                )

    def load_into_pipeline(self, pipeline: StableDiffusionXLPipeline, directory: str | os.PathLike[str]) -> None:
        pipeline.load_lora_weights(str(directory))

    def describe_file(self, path: Path, options: AdapterOptions) -> tuple[int, dict[str, str]]:
        with safe_open(str(path), framework="pt") as handle:  # the header only, no tensor loaded
            count = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
        return count, {"LoRA": json.dumps({"rank": options.rank})}

    def load_code(self, load_from: str) -> tuple[str, str]:
        return "", f"pipe.load_lora_weights({load_from!r})"

    def detect(self, metadata: Mapping[str, str], keys: Sequence[str]) -> bool:
        return is_lora_file(keys)

    def output_names(self, options: AdapterOptions) -> list[str]:
        return [LORA_WEIGHT_NAME] + ([KOHYA_WEIGHT_NAME] if options.output_kohya_format else [])

    def write_outputs(self, directory: Path, models: Mapping[str, nn.Module], options: AdapterOptions) -> None:
        self.save(directory, models)
        if options.output_kohya_format:
            write_kohya_copy(directory)


def _save_lora_weights(directory: Path, models: Mapping[str, nn.Module]) -> None:
    layers = {
        name: convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))
        for name, model in models.items()
    }
    metadata = {name: model.peft_config[ADAPTER_NAME].to_dict() for name, model in models.items()}
    StableDiffusionXLPipeline.save_lora_weights(
        directory,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
        unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
        text_encoder_2_lora_adapter_metadata=metadata.get("text_encoder_2"),
    )


def write_kohya_copy(directory: str | Path) -> Path:
    """`pytorch_lora_weights_kohya.safetensors` beside the diffusers-format LoRA file (written, then renamed)."""
    directory = Path(directory)
    peft_state = convert_all_state_dict_to_peft(load_file(str(directory / LORA_WEIGHT_NAME)))
    target = directory / KOHYA_WEIGHT_NAME
    staging = target.with_name(f".{target.name}.partial")
    try:
        save_file(convert_state_dict_to_kohya(peft_state), str(staging))
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target
