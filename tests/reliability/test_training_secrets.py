"""A token, password, key or secret given as a flag reaches no file, no log line and no upload."""

from __future__ import annotations

import argparse
from pathlib import Path

from lily_diffusion.training.outputs import REDACTED, is_secret_flag, redacted_flags, upload_selection

from .training_runs import PROMPT

SECRET = "hf_SECRETxq7Zt0k3n"
WEIGHTS = "pytorch_lily_weights.safetensors"


def test_the_hub_token_reaches_no_file_and_no_log(run_cli, train_args, tmp_path):
    out = tmp_path / "out"
    result = run_cli([
        *train_args, "--output_dir", out, "--max_train_steps", "2", "--hub_token", SECRET,
        "--report_to", "tensorboard", "--validation_prompt", PROMPT, "--num_validation_images", "1",
        "--validation_steps", "1",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    files = [path for path in out.rglob("*") if path.is_file()]
    events = [path for path in files if path.name.startswith("events.out.tfevents")]
    assert events and (out / "checkpoint-2" / "optimizer.bin") in files and (out / "validation" / "final.png") in files
    assert (out / "README.md") in files  # the model card, checked for the secret below like every file
    leaking = [path for path in files if SECRET.encode() in path.read_bytes()]
    assert leaking == []
    assert SECRET not in result.stdout and SECRET not in result.stderr
    # the flag is there, redacted: in training_args.json and in the TensorBoard hyperparameters
    assert f'"hub_token": "{REDACTED}"' in (out / "training_args.json").read_text()
    assert any(b"hub_token" in path.read_bytes() and REDACTED.encode() in path.read_bytes() for path in events)

    # what an upload takes from this very folder: never checkpoints, logs or temporary files
    (out / "README.md").write_text("# model card\n")
    (out / "checkpoint-3.partial").mkdir()
    (out / ".pytorch_lily_weights.safetensors.x1.tmp").write_bytes(b"half a file")
    (out / "validation" / "notes.txt").write_text("not an image")
    assert upload_selection(out, [WEIGHTS, "pytorch_lora_weights_kohya.safetensors"]) == [
        "README.md",
        WEIGHTS,
        "training_args.json",
        "validation/final.png",
        "validation/step_000001.png",
        "validation/step_000002.png",
    ]


def test_secret_flags_are_redacted_by_name():
    args = argparse.Namespace(
        hub_token=SECRET, db_password="p4ss", api_key="k3y", client_secret="s3cret", wandb_token=None,
        output_dir="out", learning_rate=1e-4,
    )  # fmt: skip
    assert redacted_flags(vars(args)) == {
        "hub_token": REDACTED, "db_password": REDACTED, "api_key": REDACTED, "client_secret": REDACTED,
        "wandb_token": None, "output_dir": "out", "learning_rate": 1e-4,
    }  # fmt: skip
    names = ("HUB_TOKEN", "resolution", "Key_file")
    assert [name for name in names if is_secret_flag(name)] == ["HUB_TOKEN", "Key_file"]


def test_upload_selection_of_an_empty_folder(tmp_path: Path):
    assert upload_selection(tmp_path, [WEIGHTS]) == []
    assert upload_selection(tmp_path / "missing", [WEIGHTS]) == []
