"""Optimizer (AdamW, 8-bit AdamW, Prodigy) and learning-rate scheduler, as in the diffusers DreamBooth scripts."""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler
from torch import nn

from .diffusers_flags import scaled_step_rules
from .errors import TrainingError
from .options import OptimOptions

logger = get_logger(__name__)


def parameter_groups(
    optim: OptimOptions, unet_parameters: list[nn.Parameter], text_encoder_parameters: list[nn.Parameter]
) -> list[dict[str, object]]:
    """One group for the UNet adapter and (with --train_text_encoder) one for the text encoders."""
    groups: list[dict[str, object]] = [
        {"params": unet_parameters, "lr": optim.learning_rate, "weight_decay": optim.adam_weight_decay}
    ]
    if text_encoder_parameters:
        groups.append(
            {
                "params": text_encoder_parameters,
                "lr": optim.text_encoder_lr,
                "weight_decay": optim.adam_weight_decay_text_encoder,
            }
        )
    return groups


def scale_learning_rates(optim: OptimOptions, num_processes: int) -> OptimOptions:
    """--scale_lr: both learning rates multiplied by processes x accumulation steps x batch size."""
    factor = optim.gradient_accumulation_steps * optim.train_batch_size * num_processes
    return dataclasses.replace(
        optim, learning_rate=optim.learning_rate * factor, text_encoder_lr=optim.text_encoder_lr * factor
    )


def build_optimizer(optim: OptimOptions, groups: list[dict[str, object]]) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer / --use_8bit_adam; a missing optional package is a clear error."""
    if optim.optimizer == "adamw":
        if optim.use_8bit_adam:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise TrainingError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`")
            import bitsandbytes

            optimizer_class = bitsandbytes.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        return optimizer_class(groups, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon)
    if optim.use_8bit_adam:
        logger.warning("--use_8bit_adam is ignored with --optimizer prodigy")
    if importlib.util.find_spec("prodigyopt") is None:
        raise TrainingError("--optimizer prodigy needs prodigyopt: `pip install prodigyopt`")
    import prodigyopt

    if optim.learning_rate <= 0.1:
        logger.warning(f"Prodigy usually wants --learning_rate around 1.0, got {optim.learning_rate}")
    for group in groups[1:]:
        group["lr"] = optim.learning_rate  # Prodigy adapts one learning rate for all groups
    return prodigyopt.Prodigy(
        groups,
        betas=(optim.adam_beta1, optim.adam_beta2),
        beta3=optim.prodigy_beta3,
        eps=optim.adam_epsilon,
        decouple=optim.prodigy_decouple,
        use_bias_correction=optim.prodigy_use_bias_correction,
        safeguard_warmup=optim.prodigy_safeguard_warmup,
    )


def build_lr_scheduler(
    optim: OptimOptions, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' get_scheduler; steps count once per process because accelerate steps it on every process."""
    return get_scheduler(
        optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=optim.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=optim.lr_num_cycles,
        power=optim.lr_power,
        step_rules=scaled_step_rules(optim.lr_step_rules, num_processes),
    )


RESUMED_SETTINGS = ("weight_decay", "betas", "eps")


def optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> list[dict[str, object]]:
    """Per parameter group: the base learning rate (before the schedule) and the other settings the flags set."""
    return [
        {"lr": base, **{key: group[key] for key in RESUMED_SETTINGS if key in group}}
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True)
    ]


def restore_optimizer_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    wanted: list[dict[str, object]],
) -> list[str]:
    """After loading a checkpoint (which brings its own learning rates and settings), put this run's flags back;
    returns 'lr 1e+06 -> 0.0001'-style changes (none when the flags are the checkpoint's: resume stays exact)."""
    changes = []
    loaded = optimizer_settings(optimizer, scheduler)
    for index, (group, old, new) in enumerate(zip(optimizer.param_groups, loaded, wanted, strict=True)):
        for key, value in new.items():
            if old.get(key) == value:
                continue
            changes.append(f"{key} {old.get(key)} -> {value}")
            if key == "lr":  # the schedule multiplies the base rate: rescale the current rate with it
                group["lr"] = group["lr"] * value / old["lr"] if old["lr"] else value
                group["initial_lr"] = scheduler.base_lrs[index] = value
            else:
                group[key] = value
    return changes
