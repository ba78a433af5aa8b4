"""SIGKILL the training script at several moments of a checkpoint save; `--resume_from_checkpoint latest` then
finishes with weights bit for bit equal to an uninterrupted run's.

Each kill is placed by watching the output folder: when it shows the wanted moment, the process is frozen
(SIGSTOP), the folder is checked again (the frozen process cannot change it), and only then killed (SIGKILL)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from lily_diffusion.training.checkpointing import (
    MARKER_NAME,
    checkpoint_problem,
    leftovers,
    list_checkpoints,
    resolve_resume_checkpoint,
)

from .training_runs import start

WEIGHTS = "pytorch_lily_weights.safetensors"
STEPS = ("--max_train_steps", "7", "--checkpoints_total_limit", "1")
PARTIAL = re.compile(r"^checkpoint-(\d+)\.partial$")


def _partial(out: Path, min_step: int) -> Path | None:
    """The folder a checkpoint save of step >= `min_step` is writing, if one is being written."""
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return None
    for name in names:
        match = PARTIAL.match(name)
        if match and int(match.group(1)) >= min_step:
            return out / name
    return None


def half_written(out: Path, min_step: int) -> bool:
    """accelerate is writing its files: the optimizer state is there (perhaps partly), the rest not yet."""
    folder = _partial(out, min_step)
    return folder is not None and (folder / "optimizer.bin").exists() and not (folder / "random_states_0.pkl").exists()


def written_not_marked(out: Path, min_step: int) -> bool:
    """Every file is written; the completion marker is not."""
    folder = _partial(out, min_step)
    return folder is not None and (folder / "custom_checkpoint_0.pkl").exists() and not (folder / MARKER_NAME).exists()


def marked_not_renamed(out: Path, min_step: int) -> bool:
    """Complete and marked, still under its temporary name."""
    folder = _partial(out, min_step)
    return folder is not None and (folder / MARKER_NAME).exists()


def pruning(out: Path, min_step: int) -> bool:
    """The new checkpoint is in place; the one before it is being deleted (--checkpoints_total_limit 1)."""
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return False
    return (
        any(name.endswith(".removing") for name in names)
        and max((step for step, _ in list_checkpoints(out)), default=0) >= min_step
    )


def kill_when(process: subprocess.Popen, moment: Callable[[Path, int], bool], out: Path, min_step: int) -> None:
    """SIGKILL `process` while `moment(out, min_step)` holds (checked again on the frozen process). The folder is
    watched without pause from the start of a wanted save until a little after it (its prune), else every 5 ms."""
    deadline, save_seen = time.monotonic() + 300, -1.0
    while time.monotonic() < deadline and process.poll() is None:
        if moment(out, min_step):
            os.kill(process.pid, signal.SIGSTOP)
            _, status = os.waitpid(process.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), f"the run ended (status {status}) before the kill"
            if moment(out, min_step):
                os.kill(process.pid, signal.SIGKILL)
                assert process.wait() == -signal.SIGKILL
                return
            os.kill(process.pid, signal.SIGCONT)
        if _partial(out, min_step) is not None:
            save_seen = time.monotonic()
        time.sleep(0 if time.monotonic() - save_seen < 0.2 else 0.005)
    process.kill()
    raise AssertionError(f"no checkpoint save of step >= {min_step} was caught {moment.__name__} ({process.wait()})")


def test_killed_inside_checkpoint_saves_then_resumed_is_bit_exact(train, train_args, hf_home, tmp_path, caplog):
    out = tmp_path / "killed"
    launch = [*train_args, "--output_dir", out, *STEPS, "--resume_from_checkpoint", "latest"]
    kills = [(half_written, 2), (written_not_marked, 3), (marked_not_renamed, 4), (pruning, 5)]
    for number, (moment, min_step) in enumerate(kills):
        process = start(launch, hf_home, tmp_path / f"launch-{number}.log")
        kill_when(process, moment, out, min_step)
        steps = [step for step, _ in list_checkpoints(out)]
        assert len(steps) == 1 and checkpoint_problem(out / f"checkpoint-{steps[0]}") is None
        if moment is pruning:  # the new checkpoint is complete and in place; the old one, half deleted, aside
            assert [p.name for p in leftovers(out)] == [f"checkpoint-{steps[0] - 1}.removing"]
        else:  # the save in progress is only a temporary folder; the checkpoint before it is whole
            assert [p.name for p in leftovers(out)] == [f"checkpoint-{steps[0] + 1}.partial"]
        assert resolve_resume_checkpoint("latest", out) == out / f"checkpoint-{steps[0]}"

    caplog.set_level(logging.WARNING)
    train(out, *STEPS, "--resume_from_checkpoint", "latest")
    assert "left by an interrupted save" in caplog.text
    assert leftovers(out) == [] and [p.name for _, p in list_checkpoints(out)] == ["checkpoint-7"]

    straight = tmp_path / "straight"
    train(straight, *STEPS)
    expected, got = load_file(straight / WEIGHTS), load_file(out / WEIGHTS)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert all(torch.equal(expected[key], t) for key, t in load_file(out / "checkpoint-7" / WEIGHTS).items())
