"""The loss step: noise offset, targets, Min-SNR weights and prior preservation, against hand computations."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lily_diffusion.training.loss import (
    compute_snr,
    diffusion_loss,
    prediction_target,
    sample_noise,
    sample_timesteps,
)


@pytest.fixture
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_snr_matches_alphas_cumprod(scheduler):
    timesteps = torch.tensor([0, 499, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    torch.testing.assert_close(compute_snr(scheduler, timesteps), alpha_bar / (1 - alpha_bar))
    assert compute_snr(scheduler, timesteps)[0] > compute_snr(scheduler, timesteps)[2]


def test_plain_loss_is_the_mse(scheduler):
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    parts = diffusion_loss(pred, target, torch.tensor([10, 20]), scheduler)
    assert parts.loss.item() == pytest.approx((1 + 9) / 2) and parts.prior is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(scheduler, prediction_type):
    scheduler.register_to_config(prediction_type=prediction_type)
    timesteps = torch.tensor([5, 900])  # high SNR (clipped by gamma) and low SNR
    pred, target = torch.zeros(2, 1, 1, 1), torch.tensor([2.0, 1.0]).view(2, 1, 1, 1)
    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    expected = (torch.tensor([4.0, 1.0]) * weights).mean()
    parts = diffusion_loss(pred, target, timesteps, scheduler, snr_gamma=5.0)
    assert parts.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert weights[0] < 1  # the clipped, easy timestep is down-weighted


def test_prior_preservation_uses_the_second_half(scheduler):
    pred = torch.zeros(4, 1, 1, 1)
    target = torch.tensor([1.0, 1.0, 2.0, 4.0]).view(4, 1, 1, 1)
    parts = diffusion_loss(pred, target, torch.tensor([1, 2, 3, 4]), scheduler, prior_loss_weight=0.5)
    assert parts.instance.item() == pytest.approx(1.0)
    assert parts.prior.item() == pytest.approx((4 + 16) / 2)
    assert parts.loss.item() == pytest.approx(1.0 + 0.5 * 10)


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, 0.1, torch.Generator().manual_seed(0))
    difference = offset - plain
    assert difference.abs().max() > 0
    torch.testing.assert_close(difference, difference[:, :, :1, :1].expand_as(difference))


def test_timesteps_are_reproducible_and_in_range():
    a = sample_timesteps(64, 1000, torch.Generator().manual_seed(1), torch.device("cpu"))
    b = sample_timesteps(64, 1000, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 1000 and a.dtype == torch.long


def test_prediction_targets(scheduler):
    latents, noise, timesteps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([3, 700])
    assert prediction_target(scheduler, latents, noise, timesteps) is noise
    scheduler.register_to_config(prediction_type="v_prediction")
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(2, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(prediction_target(scheduler, latents, noise, timesteps), expected)
    scheduler.register_to_config(prediction_type="sample")
    assert prediction_target(scheduler, latents, noise, timesteps) is latents
