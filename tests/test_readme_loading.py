"""The loading, peft-export and compiled/save_pretrained examples of the README's "Sharing and stacking adapters"
section run as written, on the tiny pipeline (for the hub id: a hub cache laid out by huggingface_hub's rules, read
offline)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from lily_diffusion import LilyConfig, add_lily, save_lily_weights
from tests.test_hub import COMMIT, OLD_COMMIT, put_in_hub_cache

ROOT = Path(__file__).resolve().parents[1]
HUB_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def example(heading: str) -> str:
    """The first python block under the `### heading` of the README."""
    text = (ROOT / "README.md").read_text()
    return re.search(rf"### {re.escape(heading)}\n.*?```python\n(.*?)```", text, re.S).group(1)


def run(code: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def my_lily(tiny_sdxl_dir, tmp_path) -> Path:
    """`my-lily/` in the working folder: a non-zero adapter for the tiny UNet (batch routing, as peft computes)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    add_lily(unet, LilyConfig(r=2, stride_A=2, num_B=2, init_weights=False, routing="batch"))
    return save_lily_weights(tmp_path / "my-lily", unet=unet)


def test_loading_example(tiny_sdxl_dir, my_lily, tmp_path):
    data = my_lily.read_bytes()
    cache = tmp_path / "hf_home" / "hub"
    put_in_hub_cache(cache, "user/my-lily-dog", OLD_COMMIT, {"pytorch_lily_weights.safetensors": data}, ref="v1")
    put_in_hub_cache(cache, "user/my-lily-dog", COMMIT, {"pytorch_lily_weights.safetensors": data})
    put_in_hub_cache(cache, "user/adapters", COMMIT, {"lily/dog.safetensors": data})
    code = example("Loading from the Hub, a folder, a file or a state dict").replace(HUB_MODEL, str(tiny_sdxl_dir))
    code += 'assert sorted(pipe.unet.lily_adapters) == ["default", "dog", "dog_copy", "dog_v1"]\n'
    run(code, tmp_path, {"HF_HOME": str(tmp_path / "hf_home")})


def test_peft_export_example(tiny_sdxl_dir, my_lily, tmp_path):
    code = example("Exporting to peft").replace(HUB_MODEL, str(tiny_sdxl_dir))
    code += (
        "from tests.helpers import run_unet, unet_inputs\n"
        "inputs = unet_inputs(4)\n"
        "assert (run_unet(peft_unet.base_model.model, inputs) - run_unet(unet, inputs)).abs().max() <= 1e-5\n"
    )
    run(code, tmp_path)
    assert (tmp_path / "my-lily-peft" / "adapter_model.safetensors").is_file()


def test_compiled_and_save_pretrained_example(tiny_sdxl_dir, my_lily, tmp_path):
    code = example("Compiled models and `save_pretrained`").replace(HUB_MODEL, str(tiny_sdxl_dir))
    # aot_eager: dynamo as with the default backend, without minutes of C++ compilation on a CPU
    code = code.replace("torch.compile(pipe.unet)", 'torch.compile(pipe.unet, backend="aot_eager")')
    code = code.replace("num_inference_steps=30", "num_inference_steps=2")
    run(code, tmp_path)
    with safe_open(str(tmp_path / "sdxl-copy" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        keys = handle.keys()
    assert keys and not [key for key in keys if "lily" in key]
