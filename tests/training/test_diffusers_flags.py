"""Flags with the meaning they have in diffusers' train_dreambooth_lora_sdxl.py (issue 13)."""

import random

import pytest
import torch
from PIL import Image

from lily_diffusion.training.args import parse_args, parse_options
from lily_diffusion.training.data import RESAMPLING, prepare_image
from lily_diffusion.training.optim import build_lr_scheduler

REQUIRED = ["--pretrained_model_name_or_path", "model", "--instance_data_dir", "data", "--instance_prompt", "sks"]
PIECEWISE = ["--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:3,0.1:5,0.01"]


def multipliers(argv: list[str], optimizer_steps: int, num_processes: int) -> list[float]:
    """The learning-rate multiplier at each optimizer step; the scheduler steps once per process, as in accelerate."""
    optim = parse_options([*REQUIRED, *argv, "--learning_rate", "1.0"]).optim
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.learning_rate)
    scheduler = build_lr_scheduler(optim, optimizer, max_train_steps=optimizer_steps, num_processes=num_processes)
    seen = []
    for _ in range(optimizer_steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(num_processes):
            scheduler.step()
    return seen


@pytest.mark.parametrize("num_processes", [1, 2])
def test_piecewise_constant_follows_its_step_rules_in_optimizer_steps(num_processes):
    got = multipliers(PIECEWISE, 7, num_processes)
    assert got == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_lora_flags_keep_diffusers_defaults_with_adapter_lora():
    args = parse_args([*REQUIRED, "--adapter", "lora"])
    assert (args.rank, args.lora_alpha, args.lora_dropout) == (4, None, 0.0)
    args = parse_args([*REQUIRED, "--adapter", "lora", "--rank", "8", "--lora_dropout", "0.1"])
    assert (args.rank, args.lora_dropout) == (8, 0.1)


def test_nearest_exact_is_accepted_and_is_pils_nearest_like_torchvision():
    assert parse_args([*REQUIRED, "--image_interpolation_mode", "nearest_exact"]).image_interpolation_mode == (
        "nearest_exact"
    )
    image = Image.effect_noise((37, 23), 64).convert("RGB")
    exact = prepare_image(image, 16, True, False, random.Random(0), RESAMPLING["nearest_exact"])
    nearest = prepare_image(image, 16, True, False, random.Random(0), Image.Resampling.NEAREST)
    assert torch.equal(exact.pixels, nearest.pixels)
    bilinear = prepare_image(image, 16, True, False, random.Random(0), Image.Resampling.BILINEAR)
    assert not torch.equal(exact.pixels, bilinear.pixels)
