"""Checkpoint folders: numeric ordering, completeness, the total limit, resolving --resume_from_checkpoint."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from lily_diffusion.training.checkpointing import (
    LEGACY_FILES,
    MARKER_NAME,
    TrainState,
    check_resume_step,
    checkpoint_problem,
    checkpoint_step,
    leftovers,
    list_checkpoints,
    prune_checkpoints,
    publish,
    resolve_resume_checkpoint,
    run_layout_changes,
    write_failure_message,
    write_marker,
)
from lily_diffusion.training.errors import TrainingError

STATE_FILES = (*LEGACY_FILES, "pytorch_lily_weights.safetensors")


def _fill(folder: Path, content: bytes = b"state") -> Path:
    """A folder with every file a checkpoint holds (stand-in contents)."""
    folder.mkdir()
    for name in STATE_FILES:
        (folder / name).write_bytes(content)
    return folder


def _make(tmp_path: Path, *steps: int) -> None:
    """Complete checkpoints, marked the way save_checkpoint marks them."""
    for step in steps:
        write_marker(_fill(tmp_path / f"checkpoint-{step}", f"state {step}".encode()), step)


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    _make(tmp_path, 10, 2, 100)
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-7.partial").mkdir()
    (tmp_path / "checkpoint-5").write_text("a file, not a checkpoint")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 10, 100]
    assert [p.name for p in leftovers(tmp_path)] == ["checkpoint-7.partial"]


def test_the_marker_lists_every_file_with_its_size(tmp_path):
    _make(tmp_path, 3)
    folder = tmp_path / "checkpoint-3"
    manifest = json.loads((folder / MARKER_NAME).read_text())
    assert manifest == {"step": 3, "files": {name: len(b"state 3") for name in STATE_FILES}}
    assert checkpoint_problem(folder) is None and checkpoint_step(folder) == 3


def test_incomplete_checkpoints_are_named_with_the_reason(tmp_path):
    _make(tmp_path, 1, 2, 3)
    (tmp_path / "checkpoint-1" / "optimizer.bin").write_bytes(b"")  # truncated after the marker was written
    (tmp_path / "checkpoint-2" / "scheduler.bin").unlink()
    (tmp_path / "checkpoint-3" / MARKER_NAME).write_text('{"step": 3, "files": {"../../etc/passwd": 1}}')
    assert checkpoint_problem(tmp_path / "checkpoint-1") == "optimizer.bin has 0 bytes instead of 7"
    assert checkpoint_problem(tmp_path / "checkpoint-2") == "scheduler.bin is missing"
    assert checkpoint_problem(tmp_path / "checkpoint-3") == f"its {MARKER_NAME} is malformed"


def test_a_checkpoint_without_marker_counts_only_with_all_its_files(tmp_path):
    """Checkpoints written before markers existed stay resumable; a partial one from then is refused."""
    legacy = _fill(tmp_path / "checkpoint-4")
    assert checkpoint_problem(legacy) is None
    (legacy / "optimizer.bin").write_bytes(b"")  # the 0-byte optimizer.bin a kill used to leave
    assert checkpoint_problem(legacy) == (
        f"it has no {MARKER_NAME} and optimizer.bin missing or empty (an interrupted save)"
    )
    empty = _fill(tmp_path / "checkpoint-5", b"")
    assert checkpoint_problem(empty) == (
        f"it has no {MARKER_NAME} and optimizer.bin, scheduler.bin, random_states_0.pkl, custom_checkpoint_0.pkl, "
        "the adapter file missing or empty (an interrupted save)"
    )


def test_latest_skips_incomplete_checkpoints_and_leftovers_with_a_warning(tmp_path, caplog):
    _make(tmp_path, 3, 12)
    (tmp_path / "checkpoint-20").mkdir()  # interrupted, written by an older version
    _fill(tmp_path / "checkpoint-21.partial")  # an interrupted save
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-12"
    assert f"skipping {tmp_path / 'checkpoint-20'}: it has no {MARKER_NAME}" in caplog.text
    assert f"ignoring {tmp_path / 'checkpoint-21.partial'}: left by an interrupted save" in caplog.text


def test_latest_with_only_incomplete_checkpoints_is_an_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(TrainingError, match=r"has no complete checkpoint \(incomplete: checkpoint-2\)"):
        resolve_resume_checkpoint("latest", tmp_path)


def test_resolve_latest_and_explicit_paths(tmp_path):
    assert resolve_resume_checkpoint(None, tmp_path) is None
    assert resolve_resume_checkpoint("latest", tmp_path) is None  # nothing yet: a fresh run
    (tmp_path / "checkpoint-9.partial").mkdir()
    assert resolve_resume_checkpoint("latest", tmp_path) is None  # a leftover is not a checkpoint
    _make(tmp_path, 3, 12)
    assert resolve_resume_checkpoint("latest", tmp_path).name == "checkpoint-12"
    assert resolve_resume_checkpoint("checkpoint-3", tmp_path) == tmp_path / "checkpoint-3"
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-3"), "elsewhere") == tmp_path / "checkpoint-3"
    with pytest.raises(TrainingError, match="checkpoint-7 does not exist"):
        resolve_resume_checkpoint("checkpoint-7", tmp_path)


def test_a_named_incomplete_checkpoint_is_refused(tmp_path):
    _make(tmp_path, 5)
    os.remove(tmp_path / "checkpoint-5" / "random_states_0.pkl")
    with pytest.raises(TrainingError) as error:
        resolve_resume_checkpoint("checkpoint-5", tmp_path)
    assert str(error.value) == (
        f"cannot resume from {tmp_path / 'checkpoint-5'}: it is incomplete (random_states_0.pkl is missing)"
    )


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    """Pruning runs after the new checkpoint is complete: it keeps `total_limit` complete ones, newest first."""
    _make(tmp_path, 1, 2, 10)
    (tmp_path / "checkpoint-11").mkdir()  # incomplete: neither counted nor deleted
    removed = prune_checkpoints(tmp_path, total_limit=2)
    assert [p.name for p in removed] == ["checkpoint-1"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 10, 11]
    assert leftovers(tmp_path) == []  # deleted, not left half-deleted
    assert prune_checkpoints(tmp_path, total_limit=None) == []
    assert prune_checkpoints(tmp_path, total_limit=5) == []
    assert [p.name for p in prune_checkpoints(tmp_path, total_limit=1)] == ["checkpoint-2"]
    assert checkpoint_problem(tmp_path / "checkpoint-10") is None  # the only complete one is never removed


def test_publish_renames_a_complete_checkpoint_into_place(tmp_path):
    _make(tmp_path, 4)  # from an earlier attempt at step 4 (a run resumed from an older checkpoint)
    partial = _fill(tmp_path / "checkpoint-4.partial", b"new state")
    write_marker(partial, 4)
    publish(partial, tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "optimizer.bin").read_bytes() == b"new state"


def test_train_state_round_trip_and_old_checkpoints():
    layout = {"train_batch_size": 2, "gradient_accumulation_steps": 1, "num_processes": 1}
    state = TrainState(seed=5, global_step=7, run_layout=layout)
    other = TrainState(seed=0, run_layout={**layout, "train_batch_size": 1})
    other.load_state_dict(state.state_dict())
    assert (other.seed, other.global_step, other.saved_run_layout) == (5, 7, layout)
    assert run_layout_changes(other.saved_run_layout, other.run_layout) == ["train_batch_size 2 -> 1"]
    other.load_state_dict({"seed": 5, "global_step": 7})  # a checkpoint saved before the layout was stored
    assert other.saved_run_layout == {} and run_layout_changes(other.saved_run_layout, other.run_layout) == []


def test_resume_step_check():
    check_resume_step(Path("out/checkpoint-5"), 5, 5)  # nothing to train, the weights are written: allowed
    check_resume_step(Path("out/checkpoint-5"), 5, None)
    with pytest.raises(TrainingError) as error:
        check_resume_step(Path("out/checkpoint-5"), 5, 3)
    assert str(error.value) == (
        "--max_train_steps 3 is below the step of out/checkpoint-5 (5): nothing is left to train; "
        "raise --max_train_steps or resume from an earlier checkpoint"
    )


def test_write_failure_message_names_the_space_and_what_is_intact(tmp_path):
    error = "[Errno 28] No space left on device"
    first = write_failure_message("checkpoint-3", tmp_path, error, 241_674, None)
    assert re.fullmatch(
        rf"cannot write checkpoint-3 in {re.escape(str(tmp_path))}: it needs about 242 kB, [\d.]+ [kMG]B are free "
        r"\(\[Errno 28\] No space left on device\); nothing partial was left behind; "
        r"no checkpoint had been saved before",
        first,
    ), first
    later = write_failure_message("the final weights", tmp_path, error, 512, tmp_path / "checkpoint-2")
    assert ": it needs about 512 bytes, " in later
    assert later.endswith(f"the earlier checkpoints are intact; the last complete one is {tmp_path / 'checkpoint-2'}")
