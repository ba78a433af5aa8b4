"""The model card beside the trained weights: diffusers' template and tags, the adapter's config and parameter
count read back from the file, the validation grid, a snippet that runs, no secret; what an upload takes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from diffusers import UNet2DConditionModel
from huggingface_hub import ModelCard
from PIL import Image

from lily_diffusion import LilyConfig, add_lily, save_lily_weights
from lily_diffusion.training import TrainingOptions, parse_options
from lily_diffusion.training.model_card import write_run_card
from lily_diffusion.training.outputs import upload_selection
from tests.training.conftest import REPO, cli_environment

SECRET = "hf_SECRETcard9Zq"
PROMPT = "a photo of sks square"
CONFIG = LilyConfig(r=2, stride_A=2, num_B=2, init_weights=False)


def run_args(output_dir: Path, base: Path) -> TrainingOptions:
    return parse_options([
        "--output_dir", str(output_dir), "--adapter", "lily", "--pretrained_model_name_or_path", str(base),
        "--instance_data_dir", str(output_dir), "--instance_prompt", PROMPT, "--validation_prompt",
        "sks square on a beach", "--push_to_hub", "--hub_token", SECRET, "--hub_model_id", "user/lily-square",
    ])  # fmt: skip


def test_the_card_says_what_was_trained_and_its_snippet_runs(tiny_sdxl_path, hf_home, tmp_path):
    out = tmp_path / "out"
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    adapter = add_lily(unet, CONFIG)
    save_lily_weights(out, unet=unet)
    (out / "validation").mkdir()
    Image.new("RGB", (32, 16)).save(out / "validation" / "final.png")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "optimizer.bin").write_bytes(b"state")
    (out / "logs").mkdir()
    (out / "logs" / "events.out.tfevents.1").write_bytes(b"log")

    path = write_run_card(run_args(out, tiny_sdxl_path))
    text = path.read_text()
    card = ModelCard.load(path)
    assert card.data.base_model == str(tiny_sdxl_path) and card.data.instance_prompt == PROMPT
    assert card.data.library_name == "diffusers"
    assert card.data.tags == ["lily", "dreambooth", "stable-diffusion-xl", "diffusers", "text-to-image"]
    assert f"Trainable parameters: {adapter.num_parameters:,}." in text
    config = json.loads(re.search(r"Adapter config \(unet\):\n\n```json\n(.*?)\n```", text).group(1))
    assert LilyConfig(**config) == CONFIG
    assert "Validation images for `sks square on a beach`:\n\n![validation images](validation/final.png)" in text
    assert SECRET not in text
    # an upload takes the card, the weights and the grid; never checkpoints or logs
    assert upload_selection(out, ["pytorch_lily_weights.safetensors"]) == [
        "README.md", "pytorch_lily_weights.safetensors", "validation/final.png",
    ]  # fmt: skip

    snippet = re.search(r"## Use it\n\n```python\n(.*?)```", text, re.S).group(1)
    assert f"load_lily_weights(pipe, {str(out.resolve())!r})" in snippet
    check = "\nimport numpy as np\nassert np.asarray(image).std() > 0 and image.size[0] > 0\n"
    result = subprocess.run(
        [sys.executable, "-c", snippet + check], cwd=REPO, env=cli_environment(hf_home), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_pushed_card_loads_the_repo_and_a_run_without_grid_has_none(tiny_sdxl_path, tmp_path):
    out = tmp_path / "out"
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    add_lily(unet, CONFIG)
    save_lily_weights(out, unet=unet)
    text = write_run_card(run_args(out, tiny_sdxl_path), "user/lily-square").read_text()
    assert "load_lily_weights(pipe, 'user/lily-square')" in text
    assert "validation/final.png" not in text and str(out) not in text and SECRET not in text
