"""The whole-UNet fine-tuning ceiling: its batch, arguments and table."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from benchmarks.finetune_ceiling import instance_batch, parse_args, render
from toyworld.paths import BASE_MODEL_DIR
from toyworld.subjects import SUBJECTS


def test_instance_batch_encodes_every_instance_image_with_its_own_caption():
    pipe = StableDiffusionXLPipeline.from_pretrained(BASE_MODEL_DIR, torch_dtype=torch.float32)
    latents, embeds, pooled = instance_batch(pipe, SUBJECTS["star"])
    assert latents.shape == (5, 4, 16, 16) and embeds.shape[0] == pooled.shape[0] == 5
    # two captions name the white background, so those rows match; a black-background caption differs
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[1])
    assert latents.abs().mean() > 0.1 and torch.isfinite(latents).all()


def test_arguments_are_checked_before_any_work(capsys):
    assert parse_args(["--subjects", "circle", "--steps", "5", "10"]).steps == [5, 10]
    for bad in (["--learning_rate", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert "--learning_rate must be positive" in capsys.readouterr().err


def test_table_has_a_row_per_subject_seed_and_step():
    scores = {"subject": 0.805, "similarity": 0.6, "background_seen": 1.0, "background_unseen": 1.0}
    results = {"star": {0: {600: {**scores, "class_preservation": 0.25}, 1200: {**scores, "class_preservation": 0.5}}}}
    text = render(results, 1e-4, "footer\n")
    assert "| star | 0 | 600 | 0.805 | 0.600 | 1.000 | 1.000 | 0.250 |" in text
    assert "| star | 0 | 1200 |" in text and "constant lr 0.0001" in text
