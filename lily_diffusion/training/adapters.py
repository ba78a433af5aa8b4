"""Adding the trainable adapter chosen by --adapter (see `lily_diffusion.backends`) and sizing what it saves."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from diffusers.training_utils import cast_training_params
from torch import nn

from ..backends import AdapterBackend, AdapterError, AdapterOptions
from .args import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS
from .errors import TrainingError


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

    unet_parameters: list[nn.Parameter] = field(default_factory=list)
    text_encoder_parameters: list[nn.Parameter] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        """Trainable parameter count (each shared tensor once)."""
        return sum(p.numel() for p in self.unet_parameters + self.text_encoder_parameters)


def add_adapters(
    backend: AdapterBackend, options: AdapterOptions, models: AdaptedModels, mixed_precision: bool
) -> TrainableAdapters:
    """Freeze the base weights and add the chosen adapter; trainable parameters end up in fp32."""
    for model in models.components().values():
        model.requires_grad_(False)
    unet_targets = options.target_modules or DEFAULT_UNET_TARGETS
    te_targets = options.text_encoder_target_modules or DEFAULT_TEXT_ENCODER_TARGETS
    result = TrainableAdapters()
    try:
        result.unet_parameters = backend.add(models.unet, unet_targets, options, "unet")
        for name, model in models.components().items():
            if name != "unet":
                result.text_encoder_parameters += backend.add(model, te_targets, options, name)
    except AdapterError as err:
        raise TrainingError(str(err)) from err
    if mixed_precision:
        cast_training_params(list(models.components().values()), dtype=torch.float32)
    return result


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
