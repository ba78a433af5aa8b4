"""Checkpoint folders: numeric ordering, the total limit, resolving --resume_from_checkpoint."""

from __future__ import annotations

import pytest

from lily_diffusion.training.checkpointing import (
    TrainState,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_checkpoint,
)
from lily_diffusion.training.errors import TrainingError


def _make(tmp_path, *steps):
    for step in steps:
        (tmp_path / f"checkpoint-{step}").mkdir()


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    _make(tmp_path, 10, 2, 100)
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-5").write_text("a file, not a checkpoint")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 10, 100]


def test_prune_leaves_room_for_one_more(tmp_path):
    _make(tmp_path, 1, 2, 10)
    removed = prune_checkpoints(tmp_path, total_limit=2)
    assert [p.name for p in removed] == ["checkpoint-1", "checkpoint-2"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10]
    assert prune_checkpoints(tmp_path, total_limit=None) == []
    assert prune_checkpoints(tmp_path, total_limit=5) == []


def test_resolve_latest_and_explicit_paths(tmp_path):
    assert resolve_resume_checkpoint(None, tmp_path) is None
    assert resolve_resume_checkpoint("latest", tmp_path) is None  # nothing yet: a fresh run
    _make(tmp_path, 3, 12)
    assert resolve_resume_checkpoint("latest", tmp_path).name == "checkpoint-12"
    assert resolve_resume_checkpoint("checkpoint-3", tmp_path) == tmp_path / "checkpoint-3"
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-3"), "elsewhere") == tmp_path / "checkpoint-3"
    with pytest.raises(TrainingError, match="checkpoint-7 does not exist"):
        resolve_resume_checkpoint("checkpoint-7", tmp_path)


def test_train_state_round_trip():
    state = TrainState(seed=5, global_step=7)
    other = TrainState(seed=0)
    other.load_state_dict(state.state_dict())
    assert (other.seed, other.global_step) == (5, 7)
