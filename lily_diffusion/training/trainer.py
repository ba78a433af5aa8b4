"""Wiring: accelerator, data, models, adapter, optimizer, resume, the loop, final weights and validation."""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import random
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import SchedulerMixin
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader

from .adapters import (
    KOHYA_WEIGHT_NAME,
    AdaptedModels,
    TrainableAdapters,
    add_adapters,
    all_finite,
    lily_config_from_args,
    save_adapter_weights,
    tensor_bytes,
    weight_name_for,
    write_kohya_copy,
)
from .args import ignored_flags
from .checkpointing import (
    TrainState,
    agree_on_failure,
    attempt,
    check_resume_step,
    checkpoint_step,
    register_adapter_hooks,
    resolve_resume_checkpoint,
    run_layout_changes,
    write_failure_message,
)
from .class_images import check_class_data_dir, ensure_class_images
from .conditioning import PromptCache, truncation_warnings
from .data import DreamBoothDataset, EpochShuffleSampler, collate_examples, load_class_records, load_instance_records
from .errors import TrainingError
from .hub_dataset import load_dataset_records
from .loop import LoopContext, steps_per_epoch, train
from .model_card import write_run_card
from .models import SDXLComponents, load_components, load_inference_scheduler
from .optim import (
    build_lr_scheduler,
    build_optimizer,
    check_optimizer_backend,
    optimizer_settings,
    parameter_groups,
    restore_optimizer_settings,
    scale_learning_rates,
)
from .outputs import check_output_dir, clear_output_dir, push_to_hub, tracker_config, write_training_args
from .paths import check_writable_folder
from .validation import final_validation, make_validator

logger = get_logger(__name__)

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """Accelerator with trackers, gradient accumulation and DDP that tolerates unused adapter parameters."""
    report_to = None if args.report_to in ("none", "") else args.report_to
    if report_to in ("wandb", "all") and args.hub_token is not None:
        raise TrainingError("do not combine --report_to wandb with --hub_token (the token would be logged)")
    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))
    )
    try:
        return Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=report_to,
            project_config=project,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    except (ValueError, ImportError) as err:
        raise TrainingError(f"cannot set up accelerate: {str(err).splitlines()[0]}") from err


def configure_logging(accelerator: Accelerator) -> None:
    """INFO on the main process; libraries quiet elsewhere."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def shared_seed(accelerator: Accelerator, seed: int | None) -> int:
    """--seed, or one random seed chosen on the main process and shared with the others."""
    if seed is None:
        chosen = [random.SystemRandom().randrange(2**31)]
        seed = int(broadcast_object_list(chosen, from_process=0)[0])
        logger.info(f"no --seed given; using {seed}")
    set_seed(seed)
    return seed


def check_before_work(args: argparse.Namespace) -> None:
    """Warn about flags this run ignores; refuse invalid Lily values and an output or class folder that cannot
    be written (all cheap, before any image or model is read)."""
    for message in ignored_flags(args):
        logger.warning(message)
    if args.adapter == "lily":
        lily_config_from_args(args, args.target_modules)
    check_writable_folder(args.output_dir, "--output_dir")
    if args.report_to not in ("none", ""):
        check_writable_folder(Path(args.output_dir, args.logging_dir), "--logging_dir")
    if args.with_prior_preservation:
        check_class_data_dir(args.class_data_dir, args.num_class_images)


def warn_truncated_prompts(args: argparse.Namespace, components: SDXLComponents, dataset: DreamBoothDataset) -> None:
    """Warn once per prompt flag (and once for the captions) that the tokenizers cut short."""
    captions = [r.prompt for r in dataset.instance_records if r.prompt != args.instance_prompt]
    prompts = {"--instance_prompt": [args.instance_prompt], "captions": captions}
    if args.with_prior_preservation:
        prompts["--class_prompt"] = [args.class_prompt]
    if args.validation_prompt:
        prompts["--validation_prompt"] = [args.validation_prompt]
    for message in truncation_warnings([components.tokenizer_one, components.tokenizer_two], prompts):
        logger.warning(message)


def prepare_models(
    args: argparse.Namespace, components: SDXLComponents, accelerator: Accelerator
) -> tuple[AdaptedModels, TrainableAdapters, torch.dtype]:
    """Place and cast the frozen models (VAE in fp32), then add the adapter (fp32 trainable parameters)."""
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    components.vae.requires_grad_(False).to(device, dtype=torch.float32)
    for model in (components.unet, components.text_encoder_one, components.text_encoder_two):
        model.requires_grad_(False).to(device, dtype=weight_dtype)
    adapted = AdaptedModels(
        unet=components.unet,
        text_encoder_one=components.text_encoder_one if args.train_text_encoder else None,
        text_encoder_two=components.text_encoder_two if args.train_text_encoder else None,
    )
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention needs xformers installed")
        components.unet.enable_xformers_memory_efficient_attention()
    trainable = add_adapters(args, adapted, mixed_precision=weight_dtype != torch.float32)
    if args.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            components.text_encoder_one.gradient_checkpointing_enable()
            components.text_encoder_two.gradient_checkpointing_enable()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    logger.info(f"{args.adapter}: {trainable.num_parameters:,} trainable parameters")
    return adapted, trainable, weight_dtype


def build_dataset(args: argparse.Namespace, accelerator: Accelerator, seed: int) -> DreamBoothDataset:
    """Read the instance images (and class images, generating missing ones) into the dataset."""
    if args.dataset_name is not None:
        instance = load_dataset_records(
            args.dataset_name,
            args.dataset_config_name,
            args.cache_dir,
            args.image_column,
            args.caption_column,
            args.instance_prompt,
            args.resolution,
        )
    else:
        instance = load_instance_records(
            args.instance_data_dir, args.instance_prompt, args.caption_column, args.resolution
        )
    class_records = None
    if args.with_prior_preservation:
        ensure_class_images(
            accelerator,
            args.class_data_dir,
            args.class_prompt,
            args.num_class_images,
            args.pretrained_model_name_or_path,
            args.revision,
            args.variant,
            args.prior_generation_precision,
            args.sample_batch_size,
            args.resolution,
            seed,
        )
        class_records = load_class_records(
            args.class_data_dir, args.class_prompt, args.num_class_images, args.resolution
        )
    return DreamBoothDataset(
        instance,
        class_records,
        args.resolution,
        args.center_crop,
        args.random_flip,
        args.repeats,
        seed,
        args.image_interpolation_mode,
    )


def build_prompt_cache(
    args: argparse.Namespace, components: SDXLComponents, dataset: DreamBoothDataset, device: torch.device
) -> PromptCache | None:
    """With frozen text encoders, every prompt is encoded once up front."""
    if args.train_text_encoder:
        return None
    prompts = [r.prompt for r in dataset.instance_records + dataset.class_records]
    encoders = [components.text_encoder_one, components.text_encoder_two]
    return PromptCache.build(encoders, [components.tokenizer_one, components.tokenizer_two], prompts, device)


def cache_latents(dataset: DreamBoothDataset, components: SDXLComponents, device: torch.device, batch: int) -> None:
    """--cache_latents: encode every image once with the VAE (fp32)."""
    vae = components.vae

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(pixels.to(device, dtype=vae.dtype)).latent_dist.parameters

    dataset.build_latent_cache(encode, batch)


def resume(ctx: LoopContext, path: Path, dataset: DreamBoothDataset) -> None:
    """Load a checkpoint. The run continues with the checkpoint's seed, so it replays the same randomness, and with
    this run's learning rates and optimizer settings; a warning names what differs from the checkpoint."""
    logger.info(f"resuming from {path}")
    state, scheduler = ctx.state, ctx.lr_scheduler.scheduler
    seed, wanted = state.seed, optimizer_settings(ctx.optimizer, scheduler)
    try:
        ctx.accelerator.load_state(str(path))
    except (OSError, KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise TrainingError(f"cannot resume from {path}: {(str(err).splitlines() or [repr(err)])[0]}") from err
    if not all_finite(ctx.trainable_parameters):
        raise TrainingError(
            f"cannot resume from {path}: its adapter weights are not finite; resume from an earlier one"
        )
    state.last_checkpoint = path
    if state.seed != seed:
        logger.warning(f"using the checkpoint's seed {state.seed} instead of {seed}")
        ctx.sampler.seed = dataset.seed = state.seed
    settings = restore_optimizer_settings(ctx.optimizer, scheduler, wanted)
    if settings:
        logger.warning(f"{path} was trained with other optimizer settings; using this run's ({', '.join(settings)})")
    changes = run_layout_changes(state.saved_run_layout, state.run_layout)
    if changes:
        logger.warning(
            f"{path} was trained with another batch layout ({', '.join(changes)}): training goes on with the new "
            "one, but the result will differ from an uninterrupted run"
        )


def finish(
    args: argparse.Namespace,
    accelerator: Accelerator,
    adapted: AdaptedModels,
    components: SDXLComponents,
    inference_scheduler: SchedulerMixin,
    weight_dtype: torch.dtype,
    state: TrainState,
    parameters: list[nn.Parameter],
) -> Path:
    """Write the final adapter file (main process), then optional Kohya copy, final validation and upload.

    Weights that are not finite are never written; a failed write (disk full) ends in one line on every process."""
    accelerator.wait_for_everyone()
    if not all_finite(parameters):
        raise TrainingError(f"the adapter weights are not finite at step {state.global_step}; nothing was written")
    weight_names = [weight_name_for(args.adapter)] + ([KOHYA_WEIGHT_NAME] if args.output_kohya_format else [])
    weight_file = Path(args.output_dir) / weight_names[0]

    def write() -> None:
        save_adapter_weights(args.adapter, args.output_dir, adapted)
        if args.output_kohya_format:
            write_kohya_copy(args.output_dir)

    error = agree_on_failure(attempt(write) if accelerator.is_main_process else None)
    if error is not None:
        needed = tensor_bytes(parameters) * len(weight_names)
        folder = Path(args.output_dir)
        raise TrainingError(write_failure_message("the final weights", folder, error, needed, state.last_checkpoint))
    if accelerator.is_main_process:
        logger.info(f"saved {weight_file}")
        if args.validation_prompt and args.num_validation_images:
            final_validation(
                args, accelerator, components, inference_scheduler, weight_dtype, state.seed, state.global_step
            )
        logger.info(f"model card: {write_run_card(args)}")
        if args.push_to_hub:
            push_to_hub(args, weight_names)
    accelerator.wait_for_everyone()
    return weight_file


def run_training(args: argparse.Namespace) -> Path:
    """Train and write output_dir/<adapter weights>; returns the path of the weight file."""
    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    check_before_work(args)
    check_optimizer_backend(args, accelerator.device)
    seed = shared_seed(accelerator, args.seed)
    resume_from = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_from is not None:
        check_resume_step(resume_from, checkpoint_step(resume_from), args.max_train_steps)
    check_output_dir(args, resuming=resume_from is not None)
    dataset = build_dataset(args, accelerator, seed)
    components = load_components(
        args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path, args.revision, args.variant
    )
    inference_scheduler = load_inference_scheduler(args.pretrained_model_name_or_path, args.revision)
    warn_truncated_prompts(args, components, dataset)
    adapted, trainable, weight_dtype = prepare_models(args, components, accelerator)
    if args.scale_lr:
        scale_learning_rates(args, accelerator.num_processes)
    groups = parameter_groups(args, trainable.unet_parameters, trainable.text_encoder_parameters)
    optimizer = build_optimizer(args, groups)
    sampler = EpochShuffleSampler(len(dataset), seed)
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate_examples,
        num_workers=args.dataloader_num_workers,
    )
    prompt_cache = build_prompt_cache(args, components, dataset, accelerator.device)
    if args.cache_latents:
        cache_latents(dataset, components, accelerator.device, args.train_batch_size)
    per_epoch = steps_per_epoch(len(dataloader), accelerator.num_processes, args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * per_epoch
    lr_scheduler = build_lr_scheduler(args, optimizer, max_train_steps, accelerator.num_processes)

    models = list(adapted.components().values())
    *trained, optimizer, dataloader, lr_scheduler = accelerator.prepare(*models, optimizer, dataloader, lr_scheduler)
    text_encoders = (
        trained[1:] if args.train_text_encoder else [components.text_encoder_one, components.text_encoder_two]
    )
    layout = {
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
    }
    state = TrainState(seed, run_layout=layout)
    register_adapter_hooks(accelerator, args.adapter, adapted)
    accelerator.register_for_checkpointing(state)
    trainable_parameters = trainable.unet_parameters + trainable.text_encoder_parameters
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            clear_output_dir(args)
        write_training_args(args)
        accelerator.init_trackers("dreambooth-lily", config=tracker_config(args))
    accelerator.wait_for_everyone()
    ctx = LoopContext(
        accelerator=accelerator,
        args=args,
        components=components,
        unet=trained[0],
        text_encoders=text_encoders,
        trained_models=trained,
        trainable_parameters=trainable_parameters,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataloader=dataloader,
        sampler=sampler,
        prompt_cache=prompt_cache,
        weight_dtype=weight_dtype,
        state=state,
        max_train_steps=max_train_steps,
        num_train_epochs=math.ceil(max_train_steps / per_epoch),
        steps_per_epoch=per_epoch,
        validate=make_validator(args, accelerator, components, inference_scheduler, weight_dtype, state),
    )
    if resume_from is not None:
        resume(ctx, resume_from, dataset)
        check_resume_step(resume_from, state.global_step, max_train_steps)
    logger.info(
        f"{len(dataset)} examples, {per_epoch} steps per epoch, {max_train_steps} steps, "
        f"batch {args.train_batch_size} x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation"
    )
    try:
        train(ctx)
        return finish(
            args, accelerator, adapted, components, inference_scheduler, weight_dtype, state, trainable_parameters
        )
    finally:
        accelerator.end_training()
