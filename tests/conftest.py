"""Shared fixtures: a tiny SDXL pipeline saved to disk once, reloaded through `from_pretrained`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from toyworld.tiny_sdxl import build_tiny_sdxl_pipeline

# One thread for the whole suite: the models are tiny, and on a busy 2-core machine two OpenMP threads that
# spin while they wait make them several times (up to ~100x) slower.
torch.set_num_threads(1)
logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline (random weights) written with `save_pretrained`."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def pipe(tiny_sdxl_dir: Path) -> StableDiffusionXLPipeline:
    """A fresh pipeline loaded from disk by the real loading path."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def unet(tiny_sdxl_dir: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state (adapter initialisation uses it)."""
    torch.manual_seed(0)
