"""The training loop: one loss step, gradient accumulation, logging, checkpoints, validation, resume."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adapters import all_finite, training_state_bytes
from .checkpointing import TrainState, save_checkpoint
from .conditioning import PromptCache, compute_time_ids, encode_prompts
from .data import Batch, EpochShuffleSampler
from .errors import TrainingError
from .loss import LossParts, diffusion_loss, prediction_target, sample_noise, sample_timesteps
from .models import SDXLComponents
from .seeding import derive_seed, make_generator

logger = get_logger(__name__)


@dataclass
class LoopContext:
    """Everything the loop reads; models here are the accelerate-prepared ones."""

    accelerator: Accelerator
    args: argparse.Namespace
    components: SDXLComponents
    unet: nn.Module
    text_encoders: list[nn.Module]
    trained_models: list[nn.Module]
    trainable_parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    dataloader: DataLoader
    sampler: EpochShuffleSampler
    prompt_cache: PromptCache | None
    weight_dtype: torch.dtype
    state: TrainState
    max_train_steps: int
    num_train_epochs: int
    steps_per_epoch: int
    validate: Callable[[int], None]


def encode_latents(ctx: LoopContext, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """Sample VAE latents (from pixels, or from cached latent moments) and scale them for the UNet."""
    vae = ctx.components.vae
    if "latent_moments" in batch:
        distribution = DiagonalGaussianDistribution(batch["latent_moments"].to(ctx.accelerator.device))
    else:
        with torch.no_grad():
            pixels = batch["pixel_values"].to(ctx.accelerator.device, dtype=vae.dtype)
            distribution = vae.encode(pixels).latent_dist
    latents = distribution.sample(generator=generator)
    if getattr(vae.config, "shift_factor", None) is not None:
        latents = latents - vae.config.shift_factor
    return (latents * vae.config.scaling_factor).to(ctx.weight_dtype)


def training_loss(ctx: LoopContext, batch: Batch, generator: torch.Generator) -> LossParts:
    """The loss of one (micro) batch: noise the latents, predict with the UNet, compare with the target."""
    args, device, scheduler = ctx.args, ctx.accelerator.device, ctx.components.noise_scheduler
    latents = encode_latents(ctx, batch, generator)
    noise = sample_noise(latents, args.noise_offset, generator)
    timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator, device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prompts = batch["prompts"]
    if ctx.prompt_cache is not None:
        prompt_embeds, pooled = ctx.prompt_cache.lookup(prompts)
    else:
        tokenizers = [ctx.components.tokenizer_one, ctx.components.tokenizer_two]
        prompt_embeds, pooled = encode_prompts(ctx.text_encoders, tokenizers, prompts, device)
    time_ids = compute_time_ids(
        batch["original_sizes"],
        batch["crop_top_lefts"],
        (args.resolution, args.resolution),
        device,
        ctx.weight_dtype,
    )
    model_pred = ctx.unet(
        noisy,
        timesteps,
        prompt_embeds.to(ctx.weight_dtype),
        added_cond_kwargs={"text_embeds": pooled.to(ctx.weight_dtype), "time_ids": time_ids},
        return_dict=False,
    )[0]
    target = prediction_target(scheduler, latents, noise, timesteps)
    prior_weight = args.prior_loss_weight if args.with_prior_preservation else None
    return diffusion_loss(model_pred, target, timesteps, scheduler, args.snr_gamma, prior_weight)


def _stopped(state: TrainState) -> str:
    """The end of every 'training stopped' message: which checkpoint is still good."""
    last = state.last_checkpoint
    where = f"the last checkpoint with finite weights is {last}" if last is not None else "no checkpoint was saved"
    return f"training stopped; {where}"


def _check_finite(ctx: LoopContext, parts: LossParts) -> float:
    """Mean loss over processes; every process raises together if any loss is NaN or infinite."""
    gathered = ctx.accelerator.gather(parts.loss.detach().float().reshape(1))
    if not bool(torch.isfinite(gathered).all()):
        raise TrainingError(
            f"non-finite loss ({gathered.tolist()}) at step {ctx.state.global_step + 1}: {_stopped(ctx.state)}"
        )
    return float(gathered.mean())


def _check_weights_finite(ctx: LoopContext) -> None:
    """After an update: every process raises together if any trainable weight became NaN or infinite."""
    finite = torch.tensor([int(all_finite(ctx.trainable_parameters))], device=ctx.accelerator.device)
    if not bool(ctx.accelerator.gather(finite).all()):
        lr = ctx.lr_scheduler.get_last_lr()[0]
        raise TrainingError(
            f"step {ctx.state.global_step} (learning rate {lr:g}) made the adapter weights non-finite; "
            f"{_stopped(ctx.state)}"
        )


def _optimizer_step(ctx: LoopContext) -> None:
    if ctx.accelerator.sync_gradients and ctx.args.max_grad_norm > 0:
        ctx.accelerator.clip_grad_norm_(ctx.trainable_parameters, ctx.args.max_grad_norm)
    try:
        ctx.optimizer.step()
    except RuntimeError as err:  # torch refuses a step size beyond float32 ("... without overflow")
        if "overflow" not in str(err):
            raise
        lr = ctx.lr_scheduler.get_last_lr()[0]
        raise TrainingError(
            f"step {ctx.state.global_step + 1}: the optimizer update overflows float32 (learning rate {lr:g} is too "
            f"large); {_stopped(ctx.state)}"
        ) from err
    ctx.lr_scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)


def _after_update(ctx: LoopContext, progress: tqdm, losses: list[float]) -> None:
    """Bookkeeping after an optimizer update: progress bar, trackers, checkpoint, step validation."""
    args, state = ctx.args, ctx.state
    state.global_step += 1
    loss_value = sum(losses) / len(losses)
    lr = ctx.lr_scheduler.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
    ctx.accelerator.log({"loss": loss_value, "lr": lr}, step=state.global_step)
    _check_weights_finite(ctx)
    if state.global_step % args.checkpointing_steps == 0:
        needed = training_state_bytes(ctx.trainable_parameters, ctx.optimizer)
        save_checkpoint(ctx.accelerator, args.output_dir, state, args.checkpoints_total_limit, needed)
    if args.validation_prompt and args.validation_steps and state.global_step % args.validation_steps == 0:
        ctx.validate(state.global_step)


def _run_epoch(ctx: LoopContext, loader: DataLoader, progress: tqdm) -> None:
    """One pass over `loader` (or until max_train_steps), with gradient accumulation."""
    accelerator, state = ctx.accelerator, ctx.state
    micro, losses = 0, []
    for batch in loader:
        with accelerator.accumulate(*ctx.trained_models):
            key = (state.global_step, micro, accelerator.process_index)
            torch.manual_seed(derive_seed(state.seed, "dropout", *key))  # LoRA dropout replays on resume
            generator = make_generator(accelerator.device, state.seed, "step", *key)
            parts = training_loss(ctx, batch, generator)
            losses.append(_check_finite(ctx, parts))
            accelerator.backward(parts.loss)
            _optimizer_step(ctx)
        micro += 1
        if accelerator.sync_gradients:
            _after_update(ctx, progress, losses)
            micro, losses = 0, []
            if state.global_step >= ctx.max_train_steps:
                return


def train(ctx: LoopContext) -> None:
    """Run from `ctx.state.global_step` to `ctx.max_train_steps`, skipping the batches a resumed run has seen."""
    args, state = ctx.args, ctx.state
    progress = tqdm(
        total=ctx.max_train_steps,
        initial=state.global_step,
        desc="Steps",
        disable=not ctx.accelerator.is_local_main_process,
    )
    first_epoch = state.global_step // ctx.steps_per_epoch
    skip_batches = (state.global_step % ctx.steps_per_epoch) * args.gradient_accumulation_steps
    try:
        for epoch in range(first_epoch, ctx.num_train_epochs):
            if state.global_step >= ctx.max_train_steps:
                break
            ctx.sampler.use_epoch(epoch)
            loader = ctx.dataloader
            if epoch == first_epoch and skip_batches:
                loader = ctx.accelerator.skip_first_batches(ctx.dataloader, skip_batches)
            for model in ctx.trained_models:
                model.train()
            _run_epoch(ctx, loader, progress)
            if args.validation_prompt and not args.validation_steps and epoch % args.validation_epochs == 0:
                ctx.validate(state.global_step)
    finally:
        progress.close()


def steps_per_epoch(num_batches: int, num_processes: int, accumulation: int) -> int:
    """Optimizer updates per epoch once the batches are split over `num_processes` (accelerate pads evenly)."""
    return math.ceil(math.ceil(num_batches / num_processes) / accumulation)
