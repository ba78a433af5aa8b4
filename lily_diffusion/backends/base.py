"""The adapter-backend interface: what the trainer needs from an adapter kind (Lily, LoRA, ...).

A backend adds its adapter to a model, hands the optimizer the trainable parameters, counts them for a budget,
saves them, restores them into a model being trained (resume), loads a saved result into a pipeline, and tells its
own weight files from others. A new kind is one subclass plus one entry in `lily_diffusion.backends.BACKENDS`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from diffusers import StableDiffusionXLPipeline
from torch import nn

ADAPTER_NAME = "default"  # the name the trained adapter has inside each model
Targets = Sequence[str] | str  # module-name suffixes, or one regex


class AdapterError(ValueError):
    """An adapter that cannot be added, restored or loaded as asked (the message is one sentence)."""


@dataclass(frozen=True)
class AdapterOptions:
    """The adapter flags of the training script, as given (`--adapter` picks the backend; each reads its own)."""

    adapter: str
    lily_r: int | None = None
    lily_stride_A: int | None = None
    lily_num_B: int | None = None
    lily_scaling: float | None = None
    lily_routing: str | None = None
    target_modules: list[str] | str | None = None
    text_encoder_target_modules: list[str] | str | None = None
    match_lora_budget: int | None = None
    rank: int = 4
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    use_dora: bool = False
    lokr_decompose_factor: int = -1
    lokr_decompose_both: bool = False
    output_kohya_format: bool = False
    train_text_encoder: bool = False


def copy_targets(targets: Sequence[str] | str) -> list[str] | str:
    """Suffixes as a new list; a regex (one string) as it is."""
    return targets if isinstance(targets, str) else list(targets)


class AdapterBackend(ABC):
    """One adapter kind. Models are given as {component name ("unet", "text_encoder", ...): model}."""

    kind: ClassVar[str]  # the value of --adapter
    display_name: ClassVar[str]  # how a model card names it
    weight_name: ClassVar[str]  # the file the final weights (and every checkpoint's) are written to
    file_names: ClassVar[tuple[str, ...]]  # every file a run of this kind may leave in --output_dir
    setting_flags: ClassVar[tuple[str, ...]] = ()  # flags only this kind reads (ignored, with a warning, by others)
    exclusive_flags: ClassVar[tuple[str, ...]] = ()  # flags only the kinds listing them take (refused elsewhere)
    lora_settings: ClassVar[tuple[str, ...]] = ()  # which of --rank, --lora_alpha, --lora_dropout it reads

    def check(self, options: AdapterOptions) -> None:  # noqa: B027 (optional hook: most kinds need no check)
        """Cheap checks of the settings before any model is read; raises AdapterError."""

    @abstractmethod
    def add(self, model: nn.Module, targets: Targets, options: AdapterOptions, label: str) -> list[nn.Parameter]:
        """Add the adapter to `model` (base weights already frozen); returns its trainable parameters, each once."""

    @abstractmethod
    def count_parameters(self, model: nn.Module, targets: Targets, options: AdapterOptions) -> int:
        """How many trainable parameters `add` would create on `model` (nothing is changed)."""

    @abstractmethod
    def save(self, directory: Path, models: Mapping[str, nn.Module]) -> Path:
        """Write the adapters of `models` into `directory/weight_name` (atomically); returns the file."""

    @abstractmethod
    def load_in_place(self, directory: Path, models: Mapping[str, nn.Module]) -> None:
        """Copy a saved file into the live adapter parameters (an optimizer keeps its references)."""

    @abstractmethod
    def load_into_pipeline(self, pipeline: StableDiffusionXLPipeline, directory: str | os.PathLike[str]) -> None:
        """Load a saved result into a fresh pipeline, the way a user would."""

    @abstractmethod
    def detect(self, metadata: Mapping[str, str], keys: Sequence[str]) -> bool:
        """True when a safetensors file with this metadata and these tensor keys is one of this kind's files."""

    @abstractmethod
    def describe_file(self, path: Path, options: AdapterOptions) -> tuple[int, dict[str, str]]:
        """Parameter count and per-component config (as shown on a model card) of a saved weight file."""

    @abstractmethod
    def load_code(self, load_from: str) -> tuple[str, str]:
        """(imports, one statement) that load the saved result from `load_from` into a pipeline named `pipe`."""

    def output_names(self, options: AdapterOptions) -> list[str]:
        """The final files a run writes (the weight file first)."""
        return [self.weight_name]

    def write_outputs(self, directory: Path, models: Mapping[str, nn.Module], options: AdapterOptions) -> None:
        """Write the final files of `output_names`."""
        self.save(directory, models)
