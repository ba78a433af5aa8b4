"""Optimizer groups and optional optimizers; the labelled validation grid."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lily_diffusion.images import labelled_grid
from lily_diffusion.training.args import build_parser, parse_options
from lily_diffusion.training.errors import TrainingError
from lily_diffusion.training.optim import (
    build_lr_scheduler,
    build_optimizer,
    parameter_groups,
    scale_learning_rates,
)
from lily_diffusion.training.outputs import REDACTED, write_training_args

REQUIRED = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]


def test_groups_use_the_text_encoder_learning_rate_and_decay():
    args = parse_options(
        [*REQUIRED, "--learning_rate", "1e-3", "--train_text_encoder", "--text_encoder_lr", "1e-5"]
    ).optim
    unet_p, te_p = [torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer(args, parameter_groups(args, unet_p, te_p))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-3, 1e-4), (1e-5, 1e-3)]
    assert len(parameter_groups(args, unet_p, [])) == 1


def test_scale_lr_multiplies_by_processes_accumulation_and_batch():
    options = parse_options([*REQUIRED, "--learning_rate", "1e-4", "--train_batch_size", "2",
                             "--gradient_accumulation_steps", "3"])  # fmt: skip
    scaled = scale_learning_rates(options.optim, num_processes=2)
    assert scaled.learning_rate == pytest.approx(1.2e-3) and scaled.text_encoder_lr == pytest.approx(6e-5)
    assert (options.optim.learning_rate, options.flags()["learning_rate"]) == (1e-4, 1e-4)  # what the user typed


@pytest.mark.parametrize(("flags", "package"), [(["--optimizer", "prodigy"], "prodigyopt"),
                                                 (["--use_8bit_adam"], "bitsandbytes")])  # fmt: skip
def test_missing_optional_optimizer_is_a_clear_error(monkeypatch, flags, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == package else real(name))
    args = parse_options([*REQUIRED, *flags]).optim
    with pytest.raises(TrainingError, match=f"pip install {package}"):
        build_optimizer(args, [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}])


def test_warmup_counts_steps_on_every_process():
    args = parse_options(
        [*REQUIRED, "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--learning_rate", "1.0"]
    ).optim
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(args, optimizer, max_train_steps=4, num_processes=2)
    lrs = []
    for _ in range(8):  # accelerate steps the scheduler once per process per update
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == [0.0, 0.25, 0.5, 0.75] and lrs[4] == pytest.approx(1.0) and lrs[-1] < lrs[4]


def test_labelled_grid_keeps_every_image_below_the_label():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (16, 16), c) for c in colors]
    grid = labelled_grid([[image] for image in images], title="step 4: a photo of sks dog")
    band = grid.height - 16
    assert band > 0 and grid.width >= 48
    for i, color in enumerate(colors):
        tile = np.asarray(grid.crop((16 * i, band, 16 * i + 16, band + 16)))
        assert (tile == color).all()
    label = np.asarray(grid.crop((0, 0, grid.width, band)))
    assert (label < 128).any() and (label == 255).any()  # dark text on white


def test_training_args_json_records_the_flags_as_given(tmp_path):
    flags = ["--scale_lr", "--learning_rate", "1e-4", "--train_batch_size", "2", "--hub_token", "hf_secret"]
    options = parse_options([*REQUIRED, *flags, "--output_dir", str(tmp_path)])
    scale_learning_rates(options.optim, num_processes=4)  # a derived value, never written back
    write_training_args(options)
    text = (tmp_path / "training_args.json").read_text()
    recorded = json.loads(text)
    assert recorded["learning_rate"] == 1e-4 and recorded["scale_lr"] is True and recorded["train_batch_size"] == 2
    assert recorded["hub_token"] == REDACTED and "hf_secret" not in text
    assert set(recorded) == {action.dest for action in build_parser()._actions if action.dest != "help"}


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_parameter_loop():
    args = parse_options([*REQUIRED, "--learning_rate", "1e-2", "--train_text_encoder", "--text_encoder_lr", "1e-3"])
    torch.manual_seed(0)
    unet_p, te_p = [torch.nn.Parameter(torch.randn(4, 3))], [torch.nn.Parameter(torch.randn(5))]
    reference_p = [torch.nn.Parameter(p.detach().clone()) for p in (*unet_p, *te_p)]
    start = [p.detach().clone() for p in reference_p]
    fused = build_optimizer(args.optim, parameter_groups(args.optim, unet_p, te_p))
    assert fused.defaults["fused"] is True  # one kernel per step instead of a loop over the parameters
    groups = parameter_groups(args.optim, reference_p[:1], reference_p[1:])
    reference = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=False, foreach=False)
    for step in range(5):
        for p, q in zip((*unet_p, *te_p), reference_p, strict=True):
            p.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach()
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
    for p, q, before in zip((*unet_p, *te_p), reference_p, start, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert (p - before).abs().min() > 1e-3  # every entry moved: the comparison is not of untouched tensors
