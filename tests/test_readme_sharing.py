"""The README's "Sharing and stacking adapters" examples (stacking, call scale, LoRA next to Lily) run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lily_diffusion import LilyConfig, add_lily, save_lily_weights

README = Path(__file__).resolve().parents[1] / "README.md"
HEADINGS = ("Several Lily adapters at once", "The LoRA scale of a call", "Lily next to a diffusers LoRA")
# What each example must have done, checked after it ran (appended to the script).
CHECKS = (
    'layer = next(iter(pipe.unet.lily_adapters["style"].layers.values()))\n'
    'assert layer.active_adapters == {"subject": 1.0} and set(layer.adapters) == {"subject", "style"}\n',
    "assert image.size[0] > 0\n",
    "from peft.tuners.tuners_utils import BaseTunerLayer\n"
    "assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())\n"
    'assert set(pipe.unet.lily_adapters) == {"subject", "style"}\n',
)


def example(heading: str) -> str:
    match = re.search(rf"### {re.escape(heading)}\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, heading
    return match.group(1)


@pytest.fixture
def adapter_files(tiny_sdxl_dir, tmp_path):
    """The files the examples load: two Lily adapters and a diffusers LoRA for the tiny pipeline."""
    for name, seed in (("lily-dog", 1), ("lily-watercolor", 2)):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        torch.manual_seed(seed)
        add_lily(pipe.unet, LilyConfig(r=4, stride_A=2, num_B=3, init_weights=False))
        save_lily_weights(tmp_path / name, unet=pipe.unet)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora-watercolor", unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    return tmp_path


def test_sharing_examples_run_one_after_the_other(adapter_files, tiny_sdxl_dir):
    code = "".join(example(heading) + check for heading, check in zip(HEADINGS, CHECKS, strict=True))
    code = code.replace("stabilityai/stable-diffusion-xl-base-1.0", str(tiny_sdxl_dir))
    env = {**os.environ, "PYTHONPATH": str(README.parent)}  # this checkout's library, wherever it is installed
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=adapter_files, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
