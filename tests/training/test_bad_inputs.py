"""Bad input ends in one `error:` line and a non-zero exit status, never a traceback (real script runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image


def _instance(tmp_path: Path) -> Path:
    folder = tmp_path / "instance"
    folder.mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(folder / "one.png")
    return folder


def _missing(tmp_path: Path) -> list:
    return ["--instance_data_dir", tmp_path / "nowhere"]


def _empty(tmp_path: Path) -> list:
    (tmp_path / "empty").mkdir()
    return ["--instance_data_dir", tmp_path / "empty"]


def _unreadable(tmp_path: Path) -> list:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (folder / "text.jpg").write_text("not a jpeg")
    return ["--instance_data_dir", folder]


def _prior_without_class_prompt(tmp_path: Path) -> list:
    return ["--instance_data_dir", _instance(tmp_path), "--with_prior_preservation", "--class_data_dir", tmp_path]


def _invalid_lily(tmp_path: Path) -> list:
    return ["--instance_data_dir", _instance(tmp_path), "--adapter", "lily", "--lily_num_B", "1"]


def _resume_missing(tmp_path: Path) -> list:
    return ["--instance_data_dir", _instance(tmp_path), "--resume_from_checkpoint", tmp_path / "checkpoint-7"]


def _not_sdxl(tmp_path: Path) -> list:
    folder = tmp_path / "sd15"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return ["--instance_data_dir", _instance(tmp_path), "--pretrained_model_name_or_path", folder]


CASES = {
    "missing instance folder": (_missing, 1, "does not exist"),
    "empty instance folder": (_empty, 1, "is empty"),
    "no readable image": (_unreadable, 1, "has no readable images (2 unreadable: broken.png, text.jpg)"),
    "prior preservation without class prompt": (_prior_without_class_prompt, 2, "needs --class_prompt"),
    "invalid Lily values": (_invalid_lily, 1, "invalid Lily settings"),
    "resume path that does not exist": (_resume_missing, 1, "--resume_from_checkpoint"),
    "model folder that is not SDXL": (_not_sdxl, 1, "is not an SDXL pipeline (missing text_encoder_2, tokenizer_2)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_error(case, run_cli, tiny_sdxl_path, tmp_path):
    make_args, status, message = CASES[case]
    args = [
        "--pretrained_model_name_or_path", tiny_sdxl_path, "--instance_prompt", "a photo of sks square",
        "--output_dir", tmp_path / "out", "--resolution", "16", "--report_to", "none",
        *make_args(tmp_path),
    ]  # fmt: skip
    result = run_cli(args, launcher="python")
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "error: " in last_line and message in last_line, last_line
    if case == "no readable image":  # each skipped file was named in a warning first
        assert "skipping unreadable instance file" in result.stderr and "text.jpg" in result.stderr
