"""Checkpoints through accelerate's save_state/load_state, with hooks that store only the adapter file.

Each `output_dir/checkpoint-N/` holds the adapter file (the same format as the final output, so any checkpoint
can be loaded into a pipeline), the optimizer, scheduler and RNG states, and the run's step and seed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn

from .adapters import AdaptedModels, load_adapter_weights_in_place, save_adapter_weights
from .errors import TrainingError

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class TrainState:
    """The run's progress, saved in every checkpoint (registered with `accelerator.register_for_checkpointing`)."""

    def __init__(self, seed: int, global_step: int = 0) -> None:
        self.seed = seed
        self.global_step = global_step
        self.last_checkpoint: Path | None = None

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.global_step = int(state["global_step"])


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` in `output_dir`, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that one more fits within `total_limit`; returns what was removed."""
    if total_limit is None:
        return []
    existing = list_checkpoints(output_dir)
    excess = len(existing) - (total_limit - 1)
    removed = [path for _, path in existing[: max(excess, 0)]]
    for path in removed:
        logger.info(f"removing old checkpoint {path} (--checkpoints_total_limit {total_limit})")
        shutil.rmtree(path)
    return removed


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> Path | None:
    """The folder to resume from: 'latest' (None if there is none yet) or a path, absolute or in output_dir."""
    if value is None:
        return None
    if value == "latest":
        existing = list_checkpoints(output_dir)
        if not existing:
            logger.warning(f"no checkpoint in {output_dir}; starting a new training run")
            return None
        return existing[-1][1]
    candidates = [Path(value), Path(output_dir) / Path(value).name]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise TrainingError(f"--resume_from_checkpoint {value} does not exist")


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, state: TrainState, total_limit: int | None
) -> Path:
    """Prune (main process), then save the state on every process; returns the checkpoint folder."""
    path = Path(output_dir) / f"checkpoint-{state.global_step}"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    state.last_checkpoint = path
    logger.info(f"saved {path}")
    return path


def register_adapter_hooks(accelerator: Accelerator, kind: str, adapted: AdaptedModels) -> None:
    """Make save_state write only the adapter file, and load_state restore it into the live parameters."""
    ours = [id(model) for model in adapted.components().values()]

    def is_ours(model: nn.Module) -> bool:
        return id(accelerator.unwrap_model(model)) in ours

    def save_hook(models: list[nn.Module], weights: list[dict[str, object]], output_dir: str) -> None:
        if accelerator.is_main_process:
            save_adapter_weights(kind, output_dir, adapted)
        for index in reversed(range(len(models))):
            if is_ours(models[index]) and index < len(weights):
                weights.pop(index)  # accelerate would otherwise save the whole base model

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        load_adapter_weights_in_place(kind, input_dir, adapted)
        for index in reversed(range(len(models))):
            if is_ours(models[index]):
                models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
