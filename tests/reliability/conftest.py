"""The training fixtures (tiny SDXL pipeline on disk, subject images, the CLI runner), shared with tests/training,
and `train`: the same training run in this process (a second instead of a subprocess's ten)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lily_diffusion.training import parse_options, run_training
from tests.training import conftest as training

from .training_runs import PROMPT

# pytest finds fixtures by name in this module
_accelerate_state = training._accelerate_state
tiny_sdxl_path = training.tiny_sdxl_path
subject_dir = training.subject_dir
hf_home = training.hf_home
run_cli = training.run_cli
base_args = training.base_args
lily_args = training.lily_args

Trainer = Callable[..., Path]


@pytest.fixture
def train_args(base_args: list, lily_args: list, subject_dir: Path) -> list[str]:
    """Every run here: the small Lily on the tiny pipeline, one image per step, a checkpoint after every step."""
    args = [
        *base_args, *lily_args, "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
        "--train_batch_size", "1", "--learning_rate", "1e-2", "--checkpointing_steps", "1",
    ]  # fmt: skip
    return [str(a) for a in args]


@pytest.fixture
def train(train_args: list[str]) -> Trainer:
    """`train(output_dir, *flags)`: run_training in this process (a bad input raises TrainingError, which the
    script prints as its one line); returns the final weight file."""

    def run(output_dir: Path, *flags: object) -> Path:
        return run_training(parse_options([*train_args, "--output_dir", str(output_dir), *(str(f) for f in flags)]))

    return run
