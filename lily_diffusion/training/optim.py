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


OPTIONAL_PACKAGES = {"prodigy": ("prodigyopt", "--optimizer prodigy"), "8bit": ("bitsandbytes", "--use_8bit_adam")}
PROBE_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors below 4096 elements: probe its 8-bit path


def _require(kind: str) -> None:
    package, flag = OPTIONAL_PACKAGES[kind]
    if importlib.util.find_spec(package) is None:
        raise TrainingError(f"{flag} needs {package}: `pip install {package}`")


def check_optimizer_backend(optim: OptimOptions, device: torch.device) -> None:
    """Before any work: the optional optimizer's package is installed, and 8-bit AdamW runs on `device`.

    One 8-bit AdamW step on a probe tensor: a bitsandbytes without a kernel for the device (older releases have
    none for CPU) fails here in one line instead of at the first training step."""
    if optim.optimizer == "prodigy":
        _require("prodigy")
        return
    if not optim.use_8bit_adam:
        return
    _require("8bit")
    import bitsandbytes

    probe = torch.nn.Parameter(torch.zeros(PROBE_SIZE, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        bitsandbytes.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as error:  # any failure of the third-party kernel becomes one line
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise TrainingError(
            f"--use_8bit_adam: bitsandbytes {getattr(bitsandbytes, '__version__', '?')} cannot run 8-bit AdamW on "
            f"{device.type} ({type(error).__name__}: {reason}); install a bitsandbytes release with a "
            f"{device.type} backend or leave out --use_8bit_adam"
        ) from error


# Devices with a fused AdamW kernel in every torch this project supports: one kernel steps every parameter instead
# of a loop of small ops per parameter (the toy world's LoRA on CPU: 0.3 ms instead of 2.3 ms per step)
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def fused_adamw_supported(groups: list[dict[str, object]]) -> bool:
    """Whether torch's fused AdamW can step every parameter: floating point, on a device with its kernel."""
    parameters = [p for group in groups for p in group["params"]]  # type: ignore[attr-defined]
    return bool(parameters) and all(
        p.device.type in FUSED_ADAMW_DEVICES and torch.is_floating_point(p) for p in parameters
    )


def build_optimizer(optim: OptimOptions, groups: list[dict[str, object]]) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer / --use_8bit_adam; a missing optional package is a clear error."""
    betas, eps = (optim.adam_beta1, optim.adam_beta2), optim.adam_epsilon
    if optim.optimizer == "adamw" and optim.use_8bit_adam:
        _require("8bit")
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, betas=betas, eps=eps)
    if optim.optimizer == "adamw":
        # fused=None: torch's own choice (its multi-tensor loop on accelerators without the fused kernel)
        return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=fused_adamw_supported(groups) or None)
    _require("prodigy")
    import prodigyopt

    if optim.learning_rate <= 0.1:
        logger.warning(f"Prodigy usually wants --learning_rate around 1.0, got {optim.learning_rate}")
    for group in groups[1:]:
        group["lr"] = optim.learning_rate  # Prodigy adapts one learning rate for all groups
    return prodigyopt.Prodigy(
        groups,
        betas=betas,
        beta3=optim.prodigy_beta3,
        eps=eps,
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
