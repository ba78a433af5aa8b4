"""The training loop: one loss step, gradient accumulation, logging, checkpoints, validation, resume."""

from __future__ import annotations

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
from .options import OutputOptions
from .seeding import derive_seed, make_generator

logger = get_logger(__name__)


@dataclass(frozen=True)
class LossStep:
    """The loss of one (micro) batch: the models it runs (accelerate-prepared) and the loss settings."""

    device: torch.device
    components: SDXLComponents
    unet: nn.Module
    text_encoders: list[nn.Module]
    prompt_cache: PromptCache | None
    weight_dtype: torch.dtype
    resolution: int
    noise_offset: float
    snr_gamma: float | None
    prior_loss_weight: float | None  # None without prior preservation

    def encode_latents(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Sample VAE latents (from pixels, or from cached latent moments) and scale them for the UNet."""
        vae = self.components.vae
        if "latent_moments" in batch:
            distribution = DiagonalGaussianDistribution(batch["latent_moments"].to(self.device))
        else:
            with torch.no_grad():
                distribution = vae.encode(batch["pixel_values"].to(self.device, dtype=vae.dtype)).latent_dist
        latents = distribution.sample(generator=generator)
        if getattr(vae.config, "shift_factor", None) is not None:
            latents = latents - vae.config.shift_factor
        return (latents * vae.config.scaling_factor).to(self.weight_dtype)

    def __call__(self, batch: Batch, generator: torch.Generator) -> LossParts:
        """Noise the latents, predict with the UNet, compare with the target."""
        device, scheduler = self.device, self.components.noise_scheduler
        latents = self.encode_latents(batch, generator)
        noise = sample_noise(latents, self.noise_offset, generator)
        timesteps = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator, device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prompts = batch["prompts"]
        if self.prompt_cache is not None:
            prompt_embeds, pooled = self.prompt_cache.lookup(prompts)
        else:
            tokenizers = [self.components.tokenizer_one, self.components.tokenizer_two]
            prompt_embeds, pooled = encode_prompts(self.text_encoders, tokenizers, prompts, device)
        size = (self.resolution, self.resolution)
        time_ids = compute_time_ids(batch["original_sizes"], batch["crop_top_lefts"], size, device, self.weight_dtype)
        model_pred = self.unet(
            noisy,
            timesteps,
            prompt_embeds.to(self.weight_dtype),
            added_cond_kwargs={"text_embeds": pooled.to(self.weight_dtype), "time_ids": time_ids},
            return_dict=False,
        )[0]
        target = prediction_target(scheduler, latents, noise, timesteps)
        return diffusion_loss(model_pred, target, timesteps, scheduler, self.snr_gamma, self.prior_loss_weight)


def _stopped(state: TrainState) -> str:
    """The end of every 'training stopped' message: which checkpoint is still good."""
    last = state.last_checkpoint
    where = f"the last checkpoint with finite weights is {last}" if last is not None else "no checkpoint was saved"
    return f"training stopped; {where}"


def _overflow_message(step: int, lr: float, state: TrainState) -> str:
    """The one line for a learning rate whose update leaves float32, however the optimizer meets it."""
    too_large = f"the optimizer update overflows float32 (learning rate {lr:g} is too large)"
    return f"step {step}: {too_large}; {_stopped(state)}"


@dataclass(frozen=True)
class Updater:
    """Optimizer updates of the trainable parameters: clipping, the step, and the checks that stop a diverged run."""

    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    parameters: list[nn.Parameter]
    max_grad_norm: float
    state: TrainState

    def mean_loss(self, parts: LossParts) -> float:
        """Mean loss over processes; every process raises together if any loss is NaN or infinite."""
        gathered = self.accelerator.gather(parts.loss.detach().float().reshape(1))
        if not bool(torch.isfinite(gathered).all()):
            raise TrainingError(
                f"non-finite loss ({gathered.tolist()}) at step {self.state.global_step + 1}: {_stopped(self.state)}"
            )
        return float(gathered.mean())

    def check_weights_finite(self) -> None:
        """After an update: every process raises together if any trainable weight became NaN or infinite."""
        finite = torch.tensor([int(all_finite(self.parameters))], device=self.accelerator.device)
        if not bool(self.accelerator.gather(finite).all()):
            lr = self.lr_scheduler.get_last_lr()[0]
            if lr > torch.finfo(torch.float32).max:  # a fused optimizer steps to inf where the loop raises
                raise TrainingError(_overflow_message(self.state.global_step, lr, self.state))
            raise TrainingError(
                f"step {self.state.global_step} (learning rate {lr:g}) made the adapter weights non-finite; "
                f"{_stopped(self.state)}"
            )

    def step(self) -> None:
        if self.accelerator.sync_gradients and self.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
        try:
            self.optimizer.step()
        except RuntimeError as err:  # torch refuses a step size beyond float32 ("... without overflow")
            if "overflow" not in str(err):
                raise
            lr = self.lr_scheduler.get_last_lr()[0]
            raise TrainingError(_overflow_message(self.state.global_step + 1, lr, self.state)) from err
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class Schedule:
    """How long the run is, in optimizer updates and epochs."""

    max_train_steps: int
    steps_per_epoch: int
    gradient_accumulation_steps: int

    @property
    def num_train_epochs(self) -> int:
        return math.ceil(self.max_train_steps / self.steps_per_epoch)


@dataclass(frozen=True)
class Periodic:
    """What happens every so many updates or epochs: checkpoints and validation."""

    output: OutputOptions
    validate: Callable[[int], None]

    def after_update(self, updater: Updater) -> None:
        state, output = updater.state, self.output
        if state.global_step % output.checkpointing_steps == 0:
            needed = training_state_bytes(updater.parameters, updater.optimizer)
            limit = output.checkpoints_total_limit
            save_checkpoint(updater.accelerator, output.output_dir, state, limit, needed)
        if output.validation_prompt and output.validation_steps and state.global_step % output.validation_steps == 0:
            self.validate(state.global_step)

    def after_epoch(self, epoch: int, step: int) -> None:
        output = self.output
        if output.validation_prompt and not output.validation_steps and epoch % output.validation_epochs == 0:
            self.validate(step)


def _after_update(updater: Updater, periodic: Periodic, progress: tqdm, losses: list[float]) -> None:
    """Bookkeeping after an optimizer update: progress bar, trackers, finite check, checkpoint, validation."""
    state = updater.state
    state.global_step += 1
    loss_value = sum(losses) / len(losses)
    lr = updater.lr_scheduler.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
    updater.accelerator.log({"loss": loss_value, "lr": lr}, step=state.global_step)
    updater.check_weights_finite()
    periodic.after_update(updater)


def train(
    loss_step: LossStep,
    updater: Updater,
    schedule: Schedule,
    dataloader: DataLoader,
    sampler: EpochShuffleSampler,
    trained_models: list[nn.Module],
    periodic: Periodic,
) -> None:
    """Run from the state's global_step to max_train_steps, skipping the batches a resumed run has seen."""
    accelerator, state = updater.accelerator, updater.state
    progress = tqdm(
        total=schedule.max_train_steps,
        initial=state.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    first_epoch = state.global_step // schedule.steps_per_epoch
    skip_batches = (state.global_step % schedule.steps_per_epoch) * schedule.gradient_accumulation_steps
    try:
        for epoch in range(first_epoch, schedule.num_train_epochs):
            if state.global_step >= schedule.max_train_steps:
                break
            sampler.use_epoch(epoch)
            loader = dataloader
            if epoch == first_epoch and skip_batches:
                loader = accelerator.skip_first_batches(dataloader, skip_batches)
            for model in trained_models:
                model.train()
            micro, losses = 0, []
            for batch in loader:
                with accelerator.accumulate(*trained_models):
                    key = (state.global_step, micro, accelerator.process_index)
                    torch.manual_seed(derive_seed(state.seed, "dropout", *key))  # LoRA dropout replays on resume
                    parts = loss_step(batch, make_generator(accelerator.device, state.seed, "step", *key))
                    losses.append(updater.mean_loss(parts))
                    accelerator.backward(parts.loss)
                    updater.step()
                micro += 1
                if accelerator.sync_gradients:
                    _after_update(updater, periodic, progress, losses)
                    micro, losses = 0, []
                    if state.global_step >= schedule.max_train_steps:
                        break
            periodic.after_epoch(epoch, state.global_step)
    finally:
        progress.close()


def steps_per_epoch(num_batches: int, num_processes: int, accumulation: int) -> int:
    """Optimizer updates per epoch once the batches are split over `num_processes` (accelerate pads evenly)."""
    return math.ceil(math.ceil(num_batches / num_processes) / accumulation)
