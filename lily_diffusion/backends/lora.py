"""LoRA and DoRA through peft and diffusers: `add_adapter(LoraConfig)`, saved with `save_lora_weights`.

`--adapter dora` is `--adapter lora --use_dora` (same config, same weights for the same seed); its files are told
from LoRA's by their DoRA magnitude vectors.
"""

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
from peft import LoraConfig, PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..budget import count_lora_parameters
from ..config import LilyConfig
from ..lora_files import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, is_lora_file, uniform_unet_lora_keys
from .base import ADAPTER_NAME, AdapterError, AdapterOptions, Targets, copy_targets
from .peft_kinds import PeftAdapterBackend

DORA_KEYS = ("lora_magnitude_vector", "dora_scale")  # DoRA's magnitudes: diffusers/peft and Kohya names


def is_dora_file(keys: Sequence[str]) -> bool:
    """True when a LoRA file's keys hold DoRA magnitude vectors."""
    return any(marker in key for key in keys for marker in DORA_KEYS)


class LoraBackend(PeftAdapterBackend):
    """peft LoRA; --use_dora trains DoRA, --output_kohya_format adds a Kohya copy of the final file."""

    kind = "lora"
    display_name = "LoRA"
    weight_name = LORA_WEIGHT_NAME
    file_names = (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME)
    lora_settings = ("rank", "lora_alpha", "lora_dropout")
    exclusive_flags = ("use_dora", "output_kohya_format")

    def uses_dora(self, options: AdapterOptions) -> bool:
        """Whether the adapter is DoRA (`--use_dora`)."""
        return options.use_dora

    def check(self, options: AdapterOptions) -> None:
        if self.uses_dora(options) and options.output_kohya_format:
            raise AdapterError(
                "--output_kohya_format is not supported with DoRA: diffusers' Kohya conversion leaves the DoRA "
                "magnitudes under their peft names, so Kohya tools would not read them"
            )
        if self.uses_dora(options) and options.train_text_encoder:
            raise AdapterError(
                "DoRA with --train_text_encoder is not supported: diffusers' load_lora_weights leaves out the text "
                "encoders' DoRA magnitudes (transformers 5 names them otherwise), so the saved file would not load "
                "as trained; train DoRA on the UNet only, or train_text_encoder with another adapter"
            )

    def config_at(self, options: AdapterOptions, targets: Targets, rank: int) -> LoraConfig:
        """The peft config at `rank` (alpha: --lora_alpha, else the rank)."""
        return LoraConfig(
            r=rank,
            lora_alpha=options.lora_alpha if options.lora_alpha is not None else rank,
            lora_dropout=options.lora_dropout,
            use_dora=self.uses_dora(options),
            init_lora_weights="gaussian",
            target_modules=copy_targets(targets),
        )

    def inject(self, model: nn.Module, config: PeftConfig) -> None:
        """diffusers' `add_adapter` on a diffusers model; on another (a transformers text encoder) peft's inject,
        since transformers' add_adapter wants peft >= 0.22, above every released peft."""
        if isinstance(model, ModelMixin):
            model.add_adapter(config)
        else:
            super().inject(model, config)

    def count_parameters(self, model: nn.Module, targets: Targets, options: AdapterOptions) -> int:
        if self.uses_dora(options):
            return super().count_parameters(model, targets, options)
        scope = LilyConfig(target_modules=copy_targets(targets))
        return count_lora_parameters(model, self.rank_for(model, targets, options), scope)

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
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
        count = sum(math.prod(shape) for shape in shapes.values())
        ranks = sorted(
            {shape[0] for key, shape in shapes.items() if key.endswith(("lora_A.weight", "lora.down.weight"))}
        )
        rank = ranks[0] if len(ranks) == 1 else ranks  # the rank --match_lora_budget picked, as saved
        return count, {self.display_name: json.dumps({"rank": rank})}

    def load_code(self, load_from: str) -> tuple[str, str]:
        return "", f"pipe.load_lora_weights({load_from!r})"

    def detect(self, metadata: Mapping[str, str], keys: Sequence[str]) -> bool:
        return is_lora_file(keys) and not is_dora_file(keys)

    def output_names(self, options: AdapterOptions) -> list[str]:
        return [LORA_WEIGHT_NAME] + ([KOHYA_WEIGHT_NAME] if options.output_kohya_format else [])

    def write_outputs(self, directory: Path, models: Mapping[str, nn.Module], options: AdapterOptions) -> None:
        self.save(directory, models)
        if options.output_kohya_format:
            write_kohya_copy(directory)


class DoraBackend(LoraBackend):
    """peft DoRA: `--adapter lora --use_dora` under its own name (same weights, same file name and loading)."""

    kind = "dora"
    display_name = "DoRA"
    exclusive_flags = ("use_dora", "output_kohya_format", "match_lora_budget")

    def uses_dora(self, options: AdapterOptions) -> bool:
        return True

    def detect(self, metadata: Mapping[str, str], keys: Sequence[str]) -> bool:
        return is_lora_file(keys) and is_dora_file(keys)


def _save_lora_weights(directory: Path, models: Mapping[str, nn.Module]) -> None:
    layers = {
        name: convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))
        for name, model in models.items()
    }
    layers["unet"] = uniform_unet_lora_keys(layers["unet"])
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
