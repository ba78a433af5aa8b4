"""The training script's flags as frozen dataclasses, one per argument group of `args.py`.

Field names are the flag names, so `TrainingOptions.flags()` is exactly what the user passed (after validation,
before any derived value such as a scaled learning rate): it is what training_args.json records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..backends import AdapterOptions


@dataclass(frozen=True)
class ModelOptions:
    """The base pipeline."""

    pretrained_model_name_or_path: str
    pretrained_vae_model_name_or_path: str | None
    revision: str | None
    variant: str | None


@dataclass(frozen=True)
class DataOptions:
    """Instance images (a folder or a datasets-library dataset), their prompts and preprocessing."""

    instance_data_dir: str | None
    dataset_name: str | None
    dataset_config_name: str | None
    cache_dir: str | None
    image_column: str
    caption_column: str | None
    repeats: int
    instance_prompt: str
    resolution: int
    center_crop: bool
    random_flip: bool
    image_interpolation_mode: str
    dataloader_num_workers: int


@dataclass(frozen=True)
class PriorOptions:
    """Prior preservation: the class images (generated when missing) and the weight of their loss."""

    with_prior_preservation: bool
    class_data_dir: str | None
    class_prompt: str | None
    num_class_images: int
    prior_loss_weight: float
    sample_batch_size: int
    prior_generation_precision: str | None


@dataclass(frozen=True)
class OptimOptions:
    """Optimizer, learning-rate schedule, batch layout, precision and seed."""

    learning_rate: float
    text_encoder_lr: float
    scale_lr: bool
    lr_scheduler: str
    lr_step_rules: str | None
    lr_warmup_steps: int
    lr_num_cycles: int
    lr_power: float
    optimizer: str
    use_8bit_adam: bool
    adam_beta1: float
    adam_beta2: float
    prodigy_beta3: float | None
    prodigy_decouple: bool
    prodigy_use_bias_correction: bool
    prodigy_safeguard_warmup: bool
    adam_weight_decay: float
    adam_weight_decay_text_encoder: float
    adam_epsilon: float
    max_grad_norm: float
    snr_gamma: float | None
    noise_offset: float
    train_batch_size: int
    num_train_epochs: int
    max_train_steps: int | None
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    mixed_precision: str | None
    allow_tf32: bool
    enable_xformers_memory_efficient_attention: bool
    seed: int | None
    cache_latents: bool
    local_rank: int


@dataclass(frozen=True)
class OutputOptions:
    """Output folder, checkpoints, validation images, trackers and the hub upload."""

    output_dir: str
    overwrite_output_dir: bool
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    validation_prompt: str | None
    num_validation_images: int
    validation_steps: int | None
    validation_epochs: int
    validation_seed: int | None
    num_validation_inference_steps: int
    report_to: str
    logging_dir: str
    push_to_hub: bool
    hub_token: str | None
    hub_model_id: str | None
    do_edm_style_training: bool
    config_file: str | None


@dataclass(frozen=True)
class TrainingOptions:
    """Every flag of a run, by argument group."""

    model: ModelOptions
    data: DataOptions
    prior: PriorOptions
    adapter: AdapterOptions
    optim: OptimOptions
    output: OutputOptions

    def flags(self) -> dict[str, Any]:
        """Flag name -> value, as the user passed them (after validation)."""
        return {name: value for group in asdict(self).values() for name, value in group.items()}


GROUP_TYPES = (ModelOptions, DataOptions, PriorOptions, AdapterOptions, OptimOptions, OutputOptions)
