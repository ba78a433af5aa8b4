"""Command-line flags of the DreamBooth script, with a TOML/YAML `--config_file` that the command line overrides.

Flag names and meanings follow diffusers' `examples/dreambooth/train_dreambooth_lora_sdxl.py`; Lily adds its own.
Every problem with the flags ends in a one-line `error: ...` and exit status 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from diffusers.optimization import SchedulerType

from ..config import TEXT_ENCODER_TARGET_MODULES as DEFAULT_TEXT_ENCODER_TARGETS
from ..config import UNET_TARGET_MODULES as DEFAULT_UNET_TARGETS
from .config_file import config_to_argv, load_config_file
from .errors import TrainingError

INTERPOLATION_MODES = ("lanczos", "bicubic", "bilinear", "nearest", "box", "hamming")


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line (no usage dump of 100 flags)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
        help="Caption column: of --dataset_name, or of metadata.jsonl in the instance folder "
        "(default 'text'). Images without a caption use --instance_prompt.",
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
    g.add_argument("--adapter", type=str.lower, default="lily", choices=["lily", "lora"], help="Adapter to train.")
    g.add_argument("--lily_r", type=int, default=None, help="Lily rank r (default: LilyConfig's).")
    g.add_argument("--lily_stride_A", type=int, default=None, help="Consecutive layers sharing one A.")
    g.add_argument("--lily_num_B", type=int, default=None, help="Experts in each group's B pool.")
    g.add_argument("--lily_scaling", type=float, default=None, help="Scale of the Lily update.")
    g.add_argument(
        "--lily_routing",
        type=str,
        default=None,
        choices=["sample", "batch"],
        help="'sample' (default) routes each sample alone; 'batch' averages over the batch like peft.",
    )
    g.add_argument(
        "--target_modules",
        type=str,
        nargs="+",
        default=None,
        help=f"UNet module-name suffixes to adapt (default: {' '.join(DEFAULT_UNET_TARGETS)}).",
    )
    g.add_argument(
        "--text_encoder_target_modules",
        type=str,
        nargs="+",
        default=None,
        help=f"Text encoder suffixes (default: {' '.join(DEFAULT_TEXT_ENCODER_TARGETS)}).",
    )
    g.add_argument(
        "--match_lora_budget",
        type=int,
        default=None,
        metavar="RANK",
        help="Pick the largest Lily r whose parameter count is not above LoRA at this rank.",
    )
    g.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: --rank).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    g.add_argument("--use_dora", action="store_true", help="Train DoRA instead of LoRA (with --adapter lora).")
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
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=[t.value for t in SchedulerType])
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the scheduler.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    g.add_argument("--optimizer", type=str.lower, default="adamw", choices=["adamw", "prodigy"])
    g.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--prodigy_beta3", type=float, default=None, help="Prodigy beta3 (default sqrt(beta2)).")
    g.add_argument("--prodigy_decouple", type=str2bool, nargs="?", const=True, default=True)
    g.add_argument("--prodigy_use_bias_correction", type=str2bool, nargs="?", const=True, default=True)
    g.add_argument("--prodigy_safeguard_warmup", type=str2bool, nargs="?", const=True, default=True)
    g.add_argument("--adam_weight_decay", type=float, default=1e-4, help="Weight decay of the UNet adapter.")
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3, help="Weight decay, text encoders.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 recommended).")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the per-channel noise offset.")
    g.add_argument("--train_batch_size", type=int, default=4, help="Batch size per process.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps (overrides epochs).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    g.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Precision of the frozen weights (VAE and trainable parameters stay fp32).",
    )
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    g.add_argument("--cache_latents", action="store_true", help="Encode the images with the VAE once.")
    g.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints, validation, logging")
    g.add_argument("--output_dir", type=str, default="lily-dreambooth-model")
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
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=None, help="Validate every N steps.")
    g.add_argument("--validation_epochs", type=int, default=50, help="Validate every N epochs.")
    g.add_argument("--validation_seed", type=int, default=None, help="Seed of the validation images (default --seed).")
    g.add_argument("--num_validation_inference_steps", type=int, default=25, help="Denoising steps for validation.")
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, inside --output_dir.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_model_id", type=str, default=None)
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
        description="DreamBooth for SDXL with Lily (or LoRA) adapters, under accelerate.",
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
    if args.do_edm_style_training:
        raise TrainingError("--do_edm_style_training is not supported by this script")
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
    )
    positive_or_none = (
        "max_train_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "lily_r",
        "lily_stride_A",
        "lily_num_B",
        "match_lora_budget",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in positive_or_none:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TrainingError(f"--{name} must be at least 1, got {value}")
    if args.rank < 1:
        raise TrainingError(f"--rank must be at least 1, got {args.rank}")
    if args.num_class_images < 0 or args.dataloader_num_workers < 0:
        raise TrainingError("--num_class_images and --dataloader_num_workers cannot be negative")
    if args.lily_scaling is not None and not math.isfinite(args.lily_scaling):
        raise TrainingError(f"--lily_scaling must be a finite number, got {args.lily_scaling}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise TrainingError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.adapter != "lora" and (args.use_dora or args.output_kohya_format):
        raise TrainingError("--use_dora and --output_kohya_format need --adapter lora")
    if args.adapter != "lily" and args.match_lora_budget is not None:
        raise TrainingError("--match_lora_budget needs --adapter lily")
    for name in ("learning_rate", "text_encoder_lr", "noise_offset", "prior_loss_weight", "max_grad_norm"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise TrainingError(f"--{name} must be a finite non-negative number, got {value}")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise TrainingError("give --overwrite_output_dir (start over) or --resume_from_checkpoint (go on), not both")


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags (and `--config_file`); on any problem print one line and exit with status 2."""
    parser = build_parser()
    argv = list(input_args) if input_args is not None else None
    pre = argparse.ArgumentParser(add_help=False)
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
        check_args(args)
    except TrainingError as err:
        parser.error(str(err))
    return args
