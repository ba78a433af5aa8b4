"""Command-line flags of the DreamBooth script, with a TOML/YAML `--config_file` that the command line overrides.

Flag names and meanings follow diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py`; Lily adds its own.
Every problem with the flags ends in a one-line `error: ...` and exit status 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, NoReturn

import numpy as np
from diffusers.optimization import SchedulerType

from ..backends import BACKENDS, DEFAULT_ADAPTER
from ..config import TEXT_ENCODER_TARGET_MODULES as DEFAULT_TEXT_ENCODER_TARGETS
from ..config import UNET_TARGET_MODULES as DEFAULT_UNET_TARGETS
from ..config import LilyConfig
from .config_file import config_to_argv, load_config_file
from .diffusers_flags import check_lora_flags, check_step_rules, lora_defaults
from .errors import TrainingError
from .options import GROUP_TYPES, TrainingOptions

INTERPOLATION_MODES = ("lanczos", "bicubic", "bilinear", "nearest", "nearest_exact", "box", "hamming")
LILY_DEFAULTS = LilyConfig()
VAE_SCALE_FACTOR = 8  # SDXL's VAE downsamples by 8: image sides must be multiples of it
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
# Past the largest 32-bit signed integer, counts overflow the C integers behind torch, numpy and itertools: a
# traceback deep inside a library, or a run that never starts.
MAX_COUNT = 2**31 - 1
MAX_DATALOADER_WORKERS = 256  # a process each: more than any machine has cores
# Flags naming a file or folder: an empty value (an unset shell variable) would silently mean the current folder.
PATH_FLAGS = (
    "output_dir",
    "instance_data_dir",
    "class_data_dir",
    "pretrained_vae_model_name_or_path",
    "resume_from_checkpoint",
    "config_file",
    "logging_dir",
    "cache_dir",
    "dataset_name",
)
# argparse takes only `-1` and `-1.5` for negative numbers; `-1e-4`, `-inf` and `-nan` would read as unknown
# options ("expected one argument"). With this pattern they are values, so the range checks below can speak.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)
# A module name is made of these characters; a target with any other character can only be a regex.
MODULE_NAME = re.compile(r"[A-Za-z0-9_.]+")


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line (no usage dump of 100 flags) and that reads every
    negative number (`-1e-4` too) as a value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Prints each flag's default after its help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or "required" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        default = action.default
        if isinstance(default, list | tuple):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


def str2bool(value: str) -> bool:
    """Parse 'true/false/1/0/yes/no' (diffusers passes some booleans as `--flag=True`)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="SDXL pipeline: hub id or local folder (required).",
    )
    g.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE with better numerical stability (e.g. madebyollin/sdxl-vae-fp16-fix).",
    )
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    g.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", type=str, default=None, help="Folder with the instance (subject) images.")
    g.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A datasets-library dataset (hub id or local) instead of --instance_data_dir.",
    )
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config name of --dataset_name.")
    g.add_argument("--cache_dir", type=str, default=None, help="Cache folder for --dataset_name.")
    g.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    g.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="Caption column: of --dataset_name, or of metadata.jsonl in the instance folder (a .txt beside an "
        "image not listed there also counts). Without it every image uses --instance_prompt, as in diffusers.",
    )
    g.add_argument("--repeats", type=int, default=1, help="How many times to repeat the instance images.")
    g.add_argument(
        "--instance_prompt",
        type=str,
        default=None,
        help="Prompt with the identifier of the instance, e.g. 'a photo of sks dog' (required).",
    )
    g.add_argument("--resolution", type=int, default=1024, help="Square training resolution in pixels.")
    g.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop).")
    g.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    g.add_argument(
        "--image_interpolation_mode",
        type=str.lower,
        default="lanczos",
        choices=INTERPOLATION_MODES,
        help="Resampling filter used to resize images.",
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (0: main).")


def _add_prior_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true", help="Add the prior preservation loss.")
    g.add_argument("--class_data_dir", type=str, default=None, help="Folder with (or for generated) class images.")
    g.add_argument("--class_prompt", type=str, default=None, help="Prompt of the class, e.g. 'a photo of a dog'.")
    g.add_argument(
        "--num_class_images",
        type=int,
        default=100,
        help="Minimum number of class images; missing ones are generated with the base pipeline.",
    )
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior preservation loss.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
    g.add_argument(
        "--prior_generation_precision",
        type=str,
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help="Precision of class image generation (default fp16 on GPU, fp32 on CPU).",
    )


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument(
        "--adapter", type=str.lower, default=DEFAULT_ADAPTER, choices=list(BACKENDS), help="Adapter to train."
    )
    g.add_argument("--lily_r", type=int, default=LILY_DEFAULTS.r, help="Lily rank r.")
    g.add_argument(
        "--lily_stride_A", type=int, default=LILY_DEFAULTS.stride_A, help="Consecutive layers sharing one A."
    )
    g.add_argument("--lily_num_B", type=int, default=LILY_DEFAULTS.num_B, help="Experts in each group's B pool.")
    g.add_argument("--lily_scaling", type=float, default=LILY_DEFAULTS.scaling, help="Scale of the Lily update.")
    g.add_argument(
        "--lily_routing",
        type=str,
        default=LILY_DEFAULTS.routing,
        choices=["sample", "batch"],
        help="'sample' routes each sample alone; 'batch' averages over the batch like peft.",
    )
    g.add_argument(
        "--target_modules",
        type=str,
        nargs="+",
        default=list(DEFAULT_UNET_TARGETS),
        help="UNet layers to adapt: module-name suffixes (letters, digits, '_' and '.'), or one regex matched "
        "against the full module name (a single value with any other character, e.g. '.*attn1\\.to_(q|v)').",
    )
    g.add_argument(
        "--text_encoder_target_modules",
        type=str,
        nargs="+",
        default=list(DEFAULT_TEXT_ENCODER_TARGETS),
        help="Text encoder layers to adapt with --train_text_encoder: suffixes or one regex, as --target_modules.",
    )
    g.add_argument(
        "--match_lora_budget",
        type=int,
        default=None,
        metavar="RANK",
        help="Pick the largest Lily r (or DoRA, LoKr, LoHa rank) whose parameter count is not above LoRA at this "
        "rank (default: off).",
    )
    g.add_argument(
        "--rank", type=int, default=None, help="LoRA/DoRA/LoKr/LoHa rank (default 4; an error with --adapter lily)."
    )
    g.add_argument("--lora_alpha", type=int, default=None, help="LoRA/DoRA/LoKr/LoHa alpha (default: the rank).")
    g.add_argument("--lora_dropout", type=float, default=None, help="LoRA/DoRA dropout (default 0).")
    g.add_argument(
        "--use_dora", action="store_true", help="Train DoRA instead of LoRA (with --adapter lora; as --adapter dora)."
    )
    g.add_argument(
        "--lokr_decompose_factor",
        type=int,
        default=-1,
        help="LoKr: split each dimension as (factor, dim/factor); -1 splits it near its square root (peft's "
        "decompose_factor).",
    )
    g.add_argument(
        "--lokr_decompose_both", action="store_true", help="LoKr: make the small Kronecker factor low-rank too."
    )
    g.add_argument(
        "--output_kohya_format", action="store_true", help="Also write the LoRA in Kohya format (with --adapter lora)."
    )
    g.add_argument("--train_text_encoder", action="store_true", help="Adapt both text encoders too.")


def _add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="Learning rate (after warmup).")
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, help="Learning rate of the text encoders.")
    g.add_argument(
        "--scale_lr",
        action="store_true",
        help="Scale the learning rates by processes x accumulation steps x batch size.",
    )
    g.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=[t.value for t in SchedulerType],
        help="Learning-rate schedule (diffusers' get_scheduler).",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the scheduler.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    g.add_argument(
        "--lr_step_rules",
        type=str,
        default=None,
        help="Rules of --lr_scheduler piecewise_constant, as in diffusers: '1:100,0.1:200,0.01' is a multiplier "
        "of 1 before step 100, 0.1 before step 200, then 0.01.",
    )
    g.add_argument("--optimizer", type=str.lower, default="adamw", choices=["adamw", "prodigy"], help="Optimizer.")
    g.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="beta1 of AdamW and Prodigy.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="beta2 of AdamW and Prodigy.")
    g.add_argument("--prodigy_beta3", type=float, default=None, help="Prodigy beta3 (default sqrt(beta2)).")
    g.add_argument(
        "--prodigy_decouple", type=str2bool, nargs="?", const=True, default=True, help="Prodigy: AdamW-style decay."
    )
    g.add_argument(
        "--prodigy_use_bias_correction",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="Prodigy: Adam's bias correction.",
    )
    g.add_argument(
        "--prodigy_safeguard_warmup",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="Prodigy: remove the learning rate from the denominator of D during warmup.",
    )
    g.add_argument("--adam_weight_decay", type=float, default=1e-4, help="Weight decay of the UNet adapter.")
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3, help="Weight decay, text encoders.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="epsilon of AdamW and Prodigy.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 recommended).")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the per-channel noise offset.")
    g.add_argument("--train_batch_size", type=int, default=4, help="Batch size per process.")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (unless --max_train_steps is given).")
    g.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps (overrides epochs).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer update.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    g.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Precision of the frozen weights (VAE and trainable parameters stay fp32).",
    )
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    g.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="xformers attention in the UNet."
    )
    g.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    g.add_argument("--cache_latents", action="store_true", help="Encode the images with the VAE once.")
    g.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints, validation, logging")
    g.add_argument(
        "--output_dir", type=str, default="lily-dreambooth-model", help="Folder of the weights and checkpoints."
    )
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start over in an --output_dir that holds another run: its weights, checkpoints, validation images "
        "and logs are removed first (without this flag such a folder is refused).",
    )
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save the training state every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="A checkpoint-N folder, or 'latest' for the newest one in --output_dir.",
    )
    g.add_argument("--validation_prompt", type=str, default=None, help="Prompt of the validation images.")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation.")
    g.add_argument("--validation_steps", type=int, default=None, help="Validate every N steps.")
    g.add_argument(
        "--validation_epochs", type=int, default=50, help="Validate every N epochs (unless --validation_steps)."
    )
    g.add_argument("--validation_seed", type=int, default=None, help="Seed of the validation images (default --seed).")
    g.add_argument("--num_validation_inference_steps", type=int, default=25, help="Denoising steps for validation.")
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, inside --output_dir.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    g.add_argument("--hub_token", type=str, default=None, help="Hub token for --push_to_hub (never saved).")
    g.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="Hub repository for --push_to_hub (default: --output_dir's name).",
    )
    g.add_argument("--do_edm_style_training", action="store_true", help="Not supported; accepted for a clear error.")
    g.add_argument(
        "--config_file",
        type=str,
        default=None,
        help="TOML or YAML file with the same keys as these flags; the command line overrides it.",
    )


def build_parser() -> OneLineArgumentParser:
    """The parser with every flag of the script."""
    parser = OneLineArgumentParser(
        prog="train_dreambooth_lily.py",
        description="DreamBooth for SDXL with Lily (or LoRA, DoRA, LoKr, LoHa) adapters, under accelerate.",
        formatter_class=DefaultsHelpFormatter,
    )
    for add in (
        _add_model_args,
        _add_data_args,
        _add_prior_args,
        _add_adapter_args,
        _add_optim_args,
        _add_output_args,
    ):
        add(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Cross-flag checks argparse cannot express; raises TrainingError with a one-line message."""
    _check_required(args)
    _check_not_empty(args)
    _check_counts(args)
    _check_count_bounds(args)
    _check_numbers(args)
    _check_choices(args)
    _check_optimizer_flags(args)


def _check_required(args: argparse.Namespace) -> None:
    if not args.pretrained_model_name_or_path:
        raise TrainingError("--pretrained_model_name_or_path is required")
    if args.instance_data_dir is None and args.dataset_name is None:
        raise TrainingError("--instance_data_dir (or --dataset_name) is required")
    if args.instance_data_dir is not None and args.dataset_name is not None:
        raise TrainingError("give either --instance_data_dir or --dataset_name, not both")
    if not args.instance_prompt:
        raise TrainingError("--instance_prompt is required")
    if args.with_prior_preservation:
        if not args.class_data_dir:
            raise TrainingError("--with_prior_preservation needs --class_data_dir")
        if not args.class_prompt:
            raise TrainingError("--with_prior_preservation needs --class_prompt")
        if args.num_class_images < 1:
            raise TrainingError(
                f"--with_prior_preservation needs --num_class_images of at least 1, got {args.num_class_images}"
            )
        if args.instance_data_dir is not None and _same_path(args.class_data_dir, args.instance_data_dir):
            raise TrainingError(
                "--class_data_dir must not be --instance_data_dir (class images would become instance images)"
            )
    if args.do_edm_style_training:
        raise TrainingError("--do_edm_style_training is not supported by this script")


def _check_not_empty(args: argparse.Namespace) -> None:
    for name in PATH_FLAGS:
        if getattr(args, name) == "":
            raise TrainingError(f"--{name} is empty; give a path (an empty one would mean the current folder)")


def _check_count_bounds(args: argparse.Namespace) -> None:
    """Integer flags (seeds aside, which have their own range) up to MAX_COUNT; data loader workers up to
    MAX_DATALOADER_WORKERS."""
    for name, value in vars(args).items():
        is_count = isinstance(value, int) and not isinstance(value, bool) and name not in ("seed", "validation_seed")
        if is_count and value > MAX_COUNT:
            raise TrainingError(f"--{name} {value} is too large: at most {MAX_COUNT} (2**31 - 1)")
    if args.dataloader_num_workers > MAX_DATALOADER_WORKERS:
        raise TrainingError(
            f"--dataloader_num_workers {args.dataloader_num_workers} is too many: at most {MAX_DATALOADER_WORKERS} "
            "(each is a process; a few per CPU core is plenty)"
        )


def _same_path(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def _check_counts(args: argparse.Namespace) -> None:
    positive = (
        "resolution",
        "train_batch_size",
        "gradient_accumulation_steps",
        "repeats",
        "sample_batch_size",
        "num_train_epochs",
        "checkpointing_steps",
        "num_validation_images",
        "validation_epochs",
        "num_validation_inference_steps",
        "lr_num_cycles",
    )
    positive_or_none = (
        "max_train_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "lily_r",
        "lily_stride_A",
        "lily_num_B",
        "match_lora_budget",
        "lora_alpha",
        "rank",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in positive_or_none:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TrainingError(f"--{name} must be at least 1, got {value}")
    for name in ("num_class_images", "dataloader_num_workers", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            raise TrainingError(f"--{name} cannot be negative, got {getattr(args, name)}")
    if args.resolution % VAE_SCALE_FACTOR:
        raise TrainingError(
            f"--resolution must be a multiple of {VAE_SCALE_FACTOR} (SDXL's VAE downsamples by "
            f"{VAE_SCALE_FACTOR}), got {args.resolution}"
        )
    for name in ("seed", "validation_seed"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise TrainingError(f"--{name} must be between 0 and {MAX_SEED}, got {value}")


def _check_float(name: str, value: float | None, low: float | None = None, what: str = "number") -> None:
    """`value` must be finite, representable in float32 (the parameters' precision), and at least `low`."""
    if value is None:
        return
    if not math.isfinite(value) or (low is not None and value < low):
        raise TrainingError(f"--{name} must be a finite {what}, got {value}")
    if abs(value) > FLOAT32_MAX:
        raise TrainingError(
            f"--{name} {value:g} is too large: the trained parameters are float32, whose largest value is "
            f"{FLOAT32_MAX:.4g}"
        )


def _check_numbers(args: argparse.Namespace) -> None:
    non_negative = (
        "learning_rate",
        "text_encoder_lr",
        "noise_offset",
        "prior_loss_weight",
        "max_grad_norm",
        "adam_weight_decay",
        "adam_weight_decay_text_encoder",
        "adam_epsilon",
        "lr_power",
    )
    for name in non_negative:
        _check_float(name, getattr(args, name), 0.0, "non-negative number")
    _check_float("lily_scaling", args.lily_scaling)
    if args.lokr_decompose_factor == 0 or args.lokr_decompose_factor < -1:
        raise TrainingError(f"--lokr_decompose_factor must be -1 or at least 1, got {args.lokr_decompose_factor}")
    if args.lily_scaling == 0 and "lily_scaling" in BACKENDS[args.adapter].setting_flags:
        raise TrainingError("--lily_scaling 0 switches the adapter off: nothing would train (and no gradient exists)")
    if args.snr_gamma is not None and not (math.isfinite(args.snr_gamma) and args.snr_gamma > 0):
        raise TrainingError(f"--snr_gamma must be a finite positive number, got {args.snr_gamma}")
    _check_float("snr_gamma", args.snr_gamma)  # the SNR weights are float32
    for name in ("adam_beta1", "adam_beta2", "prodigy_beta3", "lora_dropout"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise TrainingError(f"--{name} must be in [0, 1), got {value}")


def _check_choices(args: argparse.Namespace) -> None:
    defaults = flag_defaults()
    for flag in dict.fromkeys(f for backend in BACKENDS.values() for f in backend.exclusive_flags):
        kinds = [kind for kind, backend in BACKENDS.items() if flag in backend.exclusive_flags]
        if args.adapter not in kinds and getattr(args, flag) != defaults[flag]:
            raise TrainingError(
                f"--{flag} needs --adapter {', '.join(kinds[:-1])}{' or ' * (len(kinds) > 1)}{kinds[-1]}"
            )
    check_step_rules(args.lr_scheduler, args.lr_step_rules)
    check_lora_flags(vars(args), args.adapter, BACKENDS[args.adapter].lora_settings)
    for name, value in lora_defaults(vars(args)).items():
        setattr(args, name, value)
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise TrainingError("give --overwrite_output_dir (start over) or --resume_from_checkpoint (go on), not both")


PRODIGY_FLAGS = ("prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup")
TEXT_ENCODER_FLAGS = ("text_encoder_lr", "adam_weight_decay_text_encoder", "text_encoder_target_modules")


def _check_optimizer_flags(args: argparse.Namespace) -> None:
    """Refuse optimizer and text-encoder flags (set to a non-default value) that this run would not use."""
    defaults = flag_defaults()

    def given(names: Sequence[str]) -> str:
        """'--a', '--a and --b' or '' for the flags among `names` set to another value than their default."""
        flags = [f"--{name}" for name in names if getattr(args, name) != defaults[name]]
        return " and ".join(flags) + (" apply" if len(flags) > 1 else " applies") if flags else ""

    if args.optimizer == "prodigy" and args.use_8bit_adam:
        raise TrainingError("--use_8bit_adam needs --optimizer adamw (bitsandbytes has no 8-bit Prodigy)")
    if args.optimizer != "prodigy" and given(PRODIGY_FLAGS):
        raise TrainingError(f"{given(PRODIGY_FLAGS)} only to --optimizer prodigy")
    if not args.train_text_encoder and given(TEXT_ENCODER_FLAGS):
        raise TrainingError(f"{given(TEXT_ENCODER_FLAGS)} only with --train_text_encoder")
    if args.optimizer == "prodigy" and given(["text_encoder_lr"]):
        raise TrainingError(
            "--text_encoder_lr does not apply to --optimizer prodigy: Prodigy adapts one learning rate for every "
            "parameter group (scale it with --learning_rate)"
        )


def module_targets(values: Sequence[str], flag: str) -> list[str] | str:
    """Targets from the command line: module-name suffixes, or one regex matched against full module names.

    A value made only of letters, digits, `_` and `.` is a suffix (`to_out.0`); a single value with any other
    character (`.*attn1\\.to_(q|v)`) is a regex, since no module name could contain it."""
    values = list(values)
    patterns = [v for v in values if not MODULE_NAME.fullmatch(v)]
    if not patterns:
        return values
    if len(values) > 1:
        raise TrainingError(
            f"{flag}: {patterns[0]!r} is a regex, which must be the only value (suffixes are made of letters, "
            "digits, '_' and '.')"
        )
    try:
        re.compile(values[0])
    except re.error as err:
        raise TrainingError(f"{flag} {values[0]!r} is not a valid regex: {err}") from err
    return values[0]


def flag_defaults() -> dict[str, object]:
    """Every flag's default value, by name."""
    return {action.dest: action.default for action in build_parser()._actions}


def ignored_flags(options: TrainingOptions) -> list[str]:
    """One warning for each flag set to a non-default value that this run will not use."""
    args = argparse.Namespace(**options.flags())
    defaults = flag_defaults()
    scheduler = args.lr_scheduler
    rules: tuple[tuple[bool, tuple[str, ...], str], ...] = (
        (
            not args.validation_prompt,
            (
                "validation_steps",
                "validation_epochs",
                "num_validation_images",
                "validation_seed",
                "num_validation_inference_steps",
            ),
            "without --validation_prompt",
        ),
        (args.validation_steps is not None, ("validation_epochs",), "with --validation_steps"),
        (
            not args.with_prior_preservation,
            (
                "class_data_dir",
                "class_prompt",
                "num_class_images",
                "prior_loss_weight",
                "sample_batch_size",
                "prior_generation_precision",
            ),
            "without --with_prior_preservation",
        ),
        *(
            (kind != args.adapter, other_flags, f"with --adapter {args.adapter}")
            for kind, backend in BACKENDS.items()
            if (
                other_flags := tuple(f for f in backend.setting_flags if f not in BACKENDS[args.adapter].setting_flags)
            )
        ),
        (args.match_lora_budget is not None, ("lily_r",), "with --match_lora_budget (it picks r)"),
        (scheduler == "constant", ("lr_warmup_steps",), "with --lr_scheduler constant (use constant_with_warmup)"),
        (scheduler == "piecewise_constant", ("lr_warmup_steps",), "with --lr_scheduler piecewise_constant"),
        (scheduler != "piecewise_constant", ("lr_step_rules",), "without --lr_scheduler piecewise_constant"),
        (scheduler != "cosine_with_restarts", ("lr_num_cycles",), "without --lr_scheduler cosine_with_restarts"),
        (scheduler != "polynomial", ("lr_power",), "without --lr_scheduler polynomial"),
        (args.dataset_name is None, ("dataset_config_name", "cache_dir", "image_column"), "without --dataset_name"),
        (not args.push_to_hub, ("hub_token", "hub_model_id"), "without --push_to_hub"),
        (args.report_to in ("none", ""), ("logging_dir",), "with --report_to none"),
        (args.max_train_steps is not None, ("num_train_epochs",), "with --max_train_steps"),
    )
    warnings = []
    for unused, names, reason in rules:
        if unused:
            warnings += [f"--{name} is ignored {reason}" for name in names if getattr(args, name) != defaults[name]]
    return warnings


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags (and `--config_file`); on any problem print one line and exit with status 2."""
    parser = build_parser()
    argv = list(input_args) if input_args is not None else None
    pre = OneLineArgumentParser(add_help=False)
    pre.add_argument("--config_file", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    config_argv: list[str] = []
    if known.config_file:
        try:
            config_argv = config_to_argv(load_config_file(known.config_file), parser, known.config_file)
        except TrainingError as err:
            parser.error(str(err))
    cli_argv = argv if argv is not None else sys.argv[1:]
    args = parser.parse_args(config_argv + list(cli_argv))
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    try:
        args.target_modules = module_targets(args.target_modules, "--target_modules")
        args.text_encoder_target_modules = module_targets(
            args.text_encoder_target_modules, "--text_encoder_target_modules"
        )
        check_args(args)
    except TrainingError as err:
        parser.error(str(err))
    return args


def options_from_args(args: argparse.Namespace) -> TrainingOptions:
    """The typed options of parsed (and checked) flags: where the argparse Namespace stops."""
    groups = [group(**{field.name: getattr(args, field.name) for field in fields(group)}) for group in GROUP_TYPES]
    return TrainingOptions(*groups)


def parse_options(input_args: Sequence[str] | None = None) -> TrainingOptions:
    """`parse_args`, as typed options for `run_training`."""
    return options_from_args(parse_args(input_args))
