"""The denoising loss: noise (with offset), timesteps, the target, Min-SNR weighting, prior preservation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


@dataclass(frozen=True)
class LossParts:
    """The total loss and its parts (the prior part is None without prior preservation)."""

    loss: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise like `latents`, plus `noise_offset` x a per-(sample, channel) constant."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * offset
    return noise


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict for the scheduler's prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def compute_snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
    prior_loss_weight: float | None = None,
) -> LossParts:
    """MSE loss, Min-SNR weighted when `snr_gamma` is set; with `prior_loss_weight`, the batch's second half
    is the class (prior) half and adds `prior_loss_weight` x its plain MSE."""
    prior: torch.Tensor | None = None
    if prior_loss_weight is not None:
        model_pred, pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        timesteps = timesteps[: model_pred.shape[0]]
        prior = _per_sample_mse(pred_prior, target_prior).mean()
    per_sample = _per_sample_mse(model_pred, target)
    if snr_gamma is None:
        instance = per_sample.mean()
    else:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=snr_gamma)
        if scheduler.config.prediction_type == "epsilon":
            weights = weights / snr
        elif scheduler.config.prediction_type == "v_prediction":
            weights = weights / (snr + 1.0)
        instance = (per_sample * weights).mean()
    loss = instance if prior is None else instance + prior_loss_weight * prior
    return LossParts(loss, instance, prior)
