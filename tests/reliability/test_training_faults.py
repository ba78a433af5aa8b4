"""Faults during a training run on the tiny pipeline: non-finite weights, an overflowing learning rate, a full disk,
a reused output folder, resuming with other settings. Each ends in one line (a TrainingError, which the script prints
as `error: ...`) and loses nothing."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lily_diffusion.training import TrainingError, parse_args
from lily_diffusion.training.checkpointing import MARKER_NAME, checkpoint_problem, write_marker
from lily_diffusion.training.outputs import previous_run

from .training_runs import last_line, run

WEIGHTS = "pytorch_lily_weights.safetensors"


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(train, *args: object) -> str:
    """The message of the TrainingError a run ends with."""
    with pytest.raises(TrainingError) as error:
        train(*args)
    return str(error.value)


def test_an_update_that_makes_the_weights_non_finite_is_never_saved(train, tmp_path):
    """lr 1e6: step 2's loss is still finite but its update makes the weights NaN; checkpoint-2 is never written."""
    out = tmp_path / "out"
    assert _error(train, out, "--max_train_steps", 5, "--learning_rate", "1e6") == (
        "step 2 (learning rate 1e+06) made the adapter weights non-finite; training stopped; "
        f"the last checkpoint with finite weights is {out / 'checkpoint-1'}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "training_args.json"]
    assert checkpoint_problem(out / "checkpoint-1") is None
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-1" / WEIGHTS).values())


def test_a_learning_rate_that_overflows_float32_ends_in_one_line(train, tmp_path, capsys):
    """1e39 is refused with the flags; 3e38 passes them, but --scale_lr doubles it past float32 at the first step."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(
            [
                "--pretrained_model_name_or_path",
                "x",
                "--instance_data_dir",
                "x",
                "--instance_prompt",
                "x",
                "--learning_rate",
                "1e39",
            ]
        )
    assert exit_info.value.code == 2
    assert "--learning_rate 1e+39 is too large" in capsys.readouterr().err
    out = tmp_path / "out"
    assert _error(
        train, out, "--max_train_steps", 2, "--learning_rate", "3e38", "--scale_lr", "--train_batch_size", 2
    ) == (
        "step 1: the optimizer update overflows float32 (learning rate 6e+38 is too large); training stopped; "
        "no checkpoint was saved"
    )
    assert sorted(p.name for p in out.iterdir()) == ["training_args.json"]


def _script_error(result: subprocess.CompletedProcess) -> str:
    """The script's one line (exit status 1, no traceback)."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return last_line(result.stderr)


def test_a_failed_write_keeps_the_earlier_checkpoints(train, train_args, hf_home, tmp_path):
    """The script under a file size limit (RLIMIT_FSIZE): its writes fail for real, as on a full disk, first inside
    a checkpoint save, then in the final save. Nothing partial stays; what was there is byte for byte intact."""
    out = tmp_path / "out"
    train(out, "--max_train_steps", 2)
    before = _files(out)
    checkpoint_bytes = sum(json.loads((out / "checkpoint-2" / MARKER_NAME).read_text())["files"].values())
    resume = [*train_args, "--output_dir", out, "--resume_from_checkpoint", "latest"]

    line = _script_error(run([*resume, "--max_train_steps", 4], hf_home, max_file_bytes=100_000))
    match = re.fullmatch(
        rf"error: cannot write checkpoint-3 in {re.escape(str(out))}: it needs about ([\d.]+) kB, "
        rf"[\d.]+ [kMG]B are free \(.+\); nothing partial was left behind; the earlier checkpoints are intact; "
        rf"the last complete one is {re.escape(str(out / 'checkpoint-2'))}",
        line,
    )
    assert match, line
    assert float(match.group(1)) * 1000 == pytest.approx(checkpoint_bytes, rel=0.01)  # the last checkpoint's size
    after = _files(out)
    assert after.pop("training_args.json") and before.pop("training_args.json")  # rewritten by each run
    assert after == before  # checkpoint-1, checkpoint-2 and the final weights untouched; no checkpoint-3*

    line = _script_error(run([*resume, "--max_train_steps", 2], hf_home, max_file_bytes=20_000))
    weights_bytes = (out / WEIGHTS).stat().st_size
    match = re.fullmatch(
        rf"error: cannot write the final weights in {re.escape(str(out))}: it needs about ([\d.]+) kB, .+ \(.+\); "
        rf"nothing partial was left behind; the earlier checkpoints are intact; "
        rf"the last complete one is {re.escape(str(out / 'checkpoint-2'))}",
        line,
    )
    assert match, line
    assert weights_bytes / 2 < float(match.group(1)) * 1000 < weights_bytes * 2
    after = _files(out)
    after.pop("training_args.json")
    assert after == before  # the earlier final weights are whole: the new file never replaced them


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 400 kB tmpfs (needs the right to mount, e.g. root in a container; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(train, small_disk):
    """A real ENOSPC: room for one checkpoint, not two, with --checkpoints_total_limit 1 (the old checkpoint used
    to be deleted before the new one was written)."""
    out = small_disk / "out"
    message = _error(train, out, "--max_train_steps", 3, "--checkpoints_total_limit", 1)
    match = re.fullmatch(
        rf"cannot write checkpoint-2 in {re.escape(str(out))}: it needs about ([\d.]+) kB, ([\d.]+) kB are free "
        rf"\(.+\); nothing partial was left behind; the earlier checkpoints are intact; "
        rf"the last complete one is {re.escape(str(out / 'checkpoint-1'))}",
        message,
    )
    assert match, message
    assert float(match.group(1)) > float(match.group(2))  # the message explains the failure
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "training_args.json"]
    assert checkpoint_problem(out / "checkpoint-1") is None


def test_an_output_folder_with_another_run_is_refused_or_overwritten(train, tmp_path, caplog):
    out = tmp_path / "out"
    train(out, "--max_train_steps", 1)
    (out / "validation").mkdir()
    (out / "validation" / "step_000001.png").write_bytes(b"an earlier run's image")
    (out / "notes.txt").write_text("the user's own file")
    before = _files(out)

    caplog.set_level(logging.INFO)
    assert _error(train, out, "--max_train_steps", 1) == (
        f"--output_dir {out} already holds another training run (checkpoint-1, {WEIGHTS}); pass "
        "--overwrite_output_dir to replace it, --resume_from_checkpoint latest to continue it, or choose another "
        "--output_dir"
    )
    assert "instance images" not in caplog.text  # refused before reading any data or model
    assert _files(out) == before

    train(out, "--max_train_steps", 1, "--overwrite_output_dir", "--seed", 1, "--checkpointing_steps", 1000)
    for removed in ("checkpoint-1", WEIGHTS, "validation"):
        assert f"--overwrite_output_dir: removing {out / removed}" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt", WEIGHTS, "training_args.json"]
    assert (out / WEIGHTS).read_bytes() != before[WEIGHTS]  # the new run's weights

    empty = tmp_path / "empty"
    empty.mkdir()
    assert previous_run(empty, [WEIGHTS]) == [] and previous_run(tmp_path / "missing", [WEIGHTS]) == []
    train(empty, "--max_train_steps", 1)  # an empty folder is fine


def test_overwrite_and_resume_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([
            "--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p",
            "--overwrite_output_dir", "--resume_from_checkpoint", "latest",
        ])  # fmt: skip
    assert exit_info.value.code == 2
    message = "give --overwrite_output_dir (start over) or --resume_from_checkpoint (go on), not both (see --help)"
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_resume_checks_the_step_the_batch_layout_and_the_weights(train, tmp_path, caplog):
    out = tmp_path / "out"
    train(out, "--max_train_steps", 2)
    resume = (out, "--resume_from_checkpoint", "latest")

    caplog.set_level(logging.INFO)
    assert _error(train, *resume, "--max_train_steps", 1) == (
        f"--max_train_steps 1 is below the step of {out / 'checkpoint-2'} (2): nothing is left to train; "
        "raise --max_train_steps or resume from an earlier checkpoint"
    )
    assert "instance images" not in caplog.text  # refused before any expensive work

    train(*resume, "--max_train_steps", 3, "--train_batch_size", 2, "--learning_rate", "5e-3")
    checkpoint = out / "checkpoint-2"
    assert (
        f"{checkpoint} was trained with another batch layout (train_batch_size 1 -> 2): training goes on with the "
        "new one, but the result will differ from an uninterrupted run"
    ) in caplog.text
    # the checkpoint brings its optimizer's learning rate; the flag given now is the one used, and said so
    assert f"{checkpoint} was trained with other optimizer settings; using this run's (lr 0.01 -> 0.005)" in (
        caplog.text
    )
    optimizer = torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == [5e-3]

    # a checkpoint with NaN weights (as earlier versions could save) is refused, not resumed into the same failure
    poisoned = out / "checkpoint-9"
    shutil.copytree(checkpoint, poisoned)
    (poisoned / MARKER_NAME).unlink()
    with safe_open(str(poisoned / WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {key: torch.full_like(value, float("nan")) for key, value in load_file(poisoned / WEIGHTS).items()}
    save_file(tensors, poisoned / WEIGHTS, metadata=metadata)
    write_marker(poisoned, 2)
    message = _error(train, out, "--resume_from_checkpoint", poisoned, "--max_train_steps", 4)
    assert message.startswith(f"cannot resume from {poisoned}: ") and "finite" in message, message
