"""Adding the trainable adapter (Lily, or LoRA through peft) and saving/loading its weights.

Lily: `add_lily` on the UNet (and both text encoders with --train_text_encoder), saved as one
`pytorch_lily_weights.safetensors`. LoRA: peft `LoraConfig` + `add_adapter`, saved with
`StableDiffusionXLPipeline.save_lora_weights` as `pytorch_lora_weights.safetensors`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import ModelMixin, StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import (
    convert_all_state_dict_to_peft,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .. import WEIGHTS_NAME, add_lily, load_lily_weights, save_lily_weights
from ..adapter import get_lily_adapter
from ..budget import count_lora_parameters, lily_config_for_lora_budget
from ..config import LilyConfig
from ..serialization import LilyFileError, check_fits, copy_into_adapter, read_lily_file
from .args import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS
from .errors import TrainingError

logger = get_logger(__name__)

LILY_WEIGHT_NAME = WEIGHTS_NAME
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
ALL_WEIGHT_NAMES = (LILY_WEIGHT_NAME, LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME)
ADAPTER_NAME = "default"


@dataclass
class AdaptedModels:
    """The models that carry a trainable adapter (text encoders only with --train_text_encoder)."""

    unet: nn.Module
    text_encoder_one: nn.Module | None = None
    text_encoder_two: nn.Module | None = None

    def components(self) -> dict[str, nn.Module]:
        """Component name (as in the weight files) -> model, for the adapted ones."""
        named = {"unet": self.unet, "text_encoder": self.text_encoder_one, "text_encoder_2": self.text_encoder_two}
        return {name: model for name, model in named.items() if model is not None}


@dataclass
class TrainableAdapters:
    """What the optimizer gets: the unique trainable parameters, split by learning-rate group."""

    kind: str
    weight_name: str
    unet_parameters: list[nn.Parameter] = field(default_factory=list)
    text_encoder_parameters: list[nn.Parameter] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        """Trainable parameter count (each shared tensor once)."""
        return sum(p.numel() for p in self.unet_parameters + self.text_encoder_parameters)


def weight_name_for(kind: str) -> str:
    """The file name the final weights are written to."""
    return LILY_WEIGHT_NAME if kind == "lily" else LORA_WEIGHT_NAME


def lily_config_from_args(args: argparse.Namespace, targets: list[str] | str) -> LilyConfig:
    """A LilyConfig from the --lily_* flags (unset flags keep LilyConfig's defaults); `targets` are suffixes
    or one regex."""
    values: dict[str, object] = {"target_modules": _copy_targets(targets)}
    for flag, name in (
        ("lily_r", "r"),
        ("lily_stride_A", "stride_A"),
        ("lily_num_B", "num_B"),
        ("lily_scaling", "scaling"),
        ("lily_routing", "routing"),
    ):
        if getattr(args, flag) is not None:
            values[name] = getattr(args, flag)
    try:
        return LilyConfig(**values)
    except (ValueError, TypeError) as err:
        raise TrainingError(f"invalid Lily settings: {first_line(err)}") from err


def first_line(err: BaseException) -> str:
    """The first line of an error's message (torch appends pages of C++ frames to some)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an error is an allocation that failed (torch's CPU and CUDA allocators, or Python's)."""
    return isinstance(err, MemoryError) or "alloc" in str(err).lower() or "out of memory" in str(err).lower()


def _copy_targets(targets: list[str] | str) -> list[str] | str:
    """Suffixes as a new list; a regex (one string) as it is."""
    return targets if isinstance(targets, str) else list(targets)


def _add_lily(args: argparse.Namespace, model: nn.Module, targets: list[str] | str, label: str) -> list[nn.Parameter]:
    config = lily_config_from_args(args, targets)
    try:
        if args.match_lora_budget is not None:
            config = lily_config_for_lora_budget(model, args.match_lora_budget, config)
            lora_count = count_lora_parameters(model, args.match_lora_budget, config)
            logger.info(f"{label}: Lily r={config.r} fits LoRA rank {args.match_lora_budget} ({lora_count:,} params)")
        adapter = add_lily(model, config, adapter_name=ADAPTER_NAME)
    except (ValueError, TypeError) as err:
        raise TrainingError(f"invalid Lily settings for the {label}: {first_line(err)}") from err
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise TrainingError(
            f"not enough memory for the {label}'s Lily adapter (r={config.r}, num_B={config.num_B}): {first_line(err)}"
        ) from err
    parameters = list(adapter.parameters())
    logger.info(f"{label}: Lily adapter with {sum(p.numel() for p in parameters):,} trainable parameters")
    return parameters


def _add_lora(args: argparse.Namespace, model: nn.Module, targets: list[str] | str) -> list[nn.Parameter]:
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.rank,
        lora_dropout=args.lora_dropout,
        use_dora=args.use_dora,
        init_lora_weights="gaussian",
        target_modules=_copy_targets(targets),
    )
    try:
        if isinstance(model, ModelMixin):
            model.add_adapter(config)
        else:  # transformers' add_adapter wants peft >= 0.22 (transformers 5), above every released peft
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
            model.peft_config = {ADAPTER_NAME: config}  # as add_adapter records it; the saved metadata reads it
    except (ValueError, TypeError) as err:
        raise TrainingError(f"cannot add LoRA: {first_line(err)}") from err
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise TrainingError(f"not enough memory for a LoRA of rank {args.rank}: {first_line(err)}") from err
    return [p for p in model.parameters() if p.requires_grad]


def add_adapters(args: argparse.Namespace, models: AdaptedModels, mixed_precision: bool) -> TrainableAdapters:
    """Freeze the base weights and add the chosen adapter; trainable parameters end up in fp32."""
    for model in models.components().values():
        model.requires_grad_(False)
    unet_targets = _copy_targets(args.target_modules or DEFAULT_UNET_TARGETS)
    te_targets = _copy_targets(args.text_encoder_target_modules or DEFAULT_TEXT_ENCODER_TARGETS)
    result = TrainableAdapters(kind=args.adapter, weight_name=weight_name_for(args.adapter))
    text_encoders = [m for m in (models.text_encoder_one, models.text_encoder_two) if m is not None]
    if args.adapter == "lily":
        result.unet_parameters = _add_lily(args, models.unet, unet_targets, "unet")
        for i, encoder in enumerate(text_encoders):
            result.text_encoder_parameters += _add_lily(args, encoder, te_targets, f"text_encoder{'_2' if i else ''}")
    else:
        result.unet_parameters = _add_lora(args, models.unet, unet_targets)
        for encoder in text_encoders:
            result.text_encoder_parameters += _add_lora(args, encoder, te_targets)
    if mixed_precision:
        cast_training_params(list(models.components().values()), dtype=torch.float32)
    return result


def save_adapter_weights(kind: str, directory: str | Path, models: AdaptedModels) -> Path:
    """Write the adapter file into `directory` (the final output or a checkpoint-N folder)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "lily":
        return Path(
            save_lily_weights(
                directory,
                unet=models.unet,
                text_encoder=models.text_encoder_one,
                text_encoder_2=models.text_encoder_two,
                adapter_name=ADAPTER_NAME,
            )
        )
    # diffusers writes in place: write into a temporary folder beside it, then rename, so that a failed or
    # interrupted save never leaves half a file under the final name
    staging = Path(tempfile.mkdtemp(prefix=".lora-weights-", dir=directory))
    try:
        _save_lora_weights(staging, models)
        os.replace(staging / LORA_WEIGHT_NAME, directory / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory / LORA_WEIGHT_NAME


def _save_lora_weights(directory: Path, models: AdaptedModels) -> None:
    layers = {
        name: convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))
        for name, model in models.components().items()
    }
    metadata = {name: model.peft_config[ADAPTER_NAME].to_dict() for name, model in models.components().items()}
    StableDiffusionXLPipeline.save_lora_weights(
        directory,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
        unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
        text_encoder_2_lora_adapter_metadata=metadata.get("text_encoder_2"),
    )


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or an infinity (one device synchronisation for all of them)."""
    flags = [torch.isfinite(tensor).all() for tensor in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def tensor_bytes(tensors: Iterable[object]) -> int:
    """Bytes of the tensors' data (other objects count 0): about what they take in a file."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def training_state_bytes(parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """About what a checkpoint takes on disk: the trainable weights plus the optimizer's state tensors."""
    state = optimizer.state_dict()["state"]
    return tensor_bytes([*parameters, *(value for entry in state.values() for value in entry.values())])


def _copy_lily_weights_in_place(directory: Path, models: AdaptedModels) -> None:
    """Copy a saved Lily file into the live adapter parameters (the optimizer keeps its references)."""
    try:
        stored = read_lily_file(directory)
        for component, model in models.components().items():
            if component not in stored:
                raise TrainingError(f"checkpoint {directory} has no Lily weights for the {component}")
            adapter = get_lily_adapter(model, ADAPTER_NAME)
            if stored[component].config != adapter.config:
                raise TrainingError(f"checkpoint {directory} was trained with another Lily config for the {component}")
            check_fits(model, stored[component], component)
            copy_into_adapter(adapter, stored[component].tensors)
    except LilyFileError as err:
        raise TrainingError(f"cannot resume from {directory}: {err}") from err


def _copy_lora_weights_in_place(directory: Path, models: AdaptedModels) -> None:
    state_dict, _ = StableDiffusionXLPipeline.lora_state_dict(str(directory))
    for component, model in models.components().items():
        prefix = f"{component}."
        part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        result = set_peft_model_state_dict(model, part, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise TrainingError(f"checkpoint {directory} has unexpected LoRA keys for {component}: {unexpected[:3]}")


def load_adapter_weights_in_place(kind: str, directory: str | Path, models: AdaptedModels) -> None:
    """Restore adapter weights from a checkpoint folder into the models being trained."""
    directory = Path(directory)
    if not (directory / weight_name_for(kind)).is_file():
        raise TrainingError(f"checkpoint {directory} has no {weight_name_for(kind)} (trained with another adapter?)")
    if kind == "lily":
        _copy_lily_weights_in_place(directory, models)
    else:
        _copy_lora_weights_in_place(directory, models)


def load_adapter_into_pipeline(kind: str, pipeline: StableDiffusionXLPipeline, directory: str | Path) -> None:
    """Load the saved result into a fresh pipeline the way a user would."""
    if kind == "lily":
        load_lily_weights(pipeline, directory)
    else:
        pipeline.load_lora_weights(str(directory))


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
