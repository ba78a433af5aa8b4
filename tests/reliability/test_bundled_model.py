"""The bundled toy model loads and runs the way every diffusers user loads a model folder: no dtype argument."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "assets" / "toy-sdxl-base"


def test_plain_from_pretrained_then_call(monkeypatch):
    monkeypatch.chdir(REPO)
    pipe = StableDiffusionXLPipeline.from_pretrained("assets/toy-sdxl-base")
    image = pipe("a photo of a star", num_inference_steps=2).images[0]
    assert image.size == (32, 32)
    pixels = np.asarray(image).astype(int)
    assert pixels.std() > 5  # a picture, not a blank or NaN-black square
    dtypes = {name: module.dtype for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    assert set(dtypes.values()) == {torch.float32}, dtypes


def test_weights_are_fp32_holding_the_trained_fp16_values():
    """fp16 -> fp32 is exact, so every score measured on the fp16 release still holds."""
    for path in sorted(MODEL.glob("*/*.safetensors")):
        for key, tensor in load_file(str(path)).items():
            assert tensor.dtype == torch.float32, (path, key)
            assert torch.equal(tensor.half().float(), tensor), (path, key)


def test_the_readme_python_example_runs_on_the_bundled_model(tmp_path):
    example = re.search(r"## Python API\n\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    code = example.replace("stabilityai/stable-diffusion-xl-base-1.0", str(MODEL))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "my-lily" / "pytorch_lily_weights.safetensors").is_file()
