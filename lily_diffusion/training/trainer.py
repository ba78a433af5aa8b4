"""Wiring: accelerator, data, models, adapter, optimizer, resume, the loop, final weights and validation."""

from __future__ import annotations

import logging
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

from ..backends import AdapterBackend, AdapterError, get_backend
from ..messages import first_line
from .adapters import AdaptedModels, TrainableAdapters, add_adapters, all_finite, tensor_bytes
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
from .loop import LossStep, Periodic, Schedule, Updater, steps_per_epoch, train
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
from .options import OptimOptions, OutputOptions, TrainingOptions
from .outputs import check_output_dir, clear_output_dir, push_to_hub, tracker_config, write_training_args
from .paths import check_writable_folder
from .validation import ValidationSettings, final_validation, make_validator

logger = get_logger(__name__)

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(output: OutputOptions, optim: OptimOptions) -> Accelerator:
    """Accelerator with trackers, gradient accumulation and DDP that tolerates unused adapter parameters."""
    report_to = None if output.report_to in ("none", "") else output.report_to
    if report_to in ("wandb", "all") and output.hub_token is not None:
        raise TrainingError("do not combine --report_to wandb with --hub_token (the token would be logged)")
    project = ProjectConfiguration(
        project_dir=output.output_dir, logging_dir=str(Path(output.output_dir, output.logging_dir))
    )
    try:
        return Accelerator(
            gradient_accumulation_steps=optim.gradient_accumulation_steps,
            mixed_precision=optim.mixed_precision,
            log_with=report_to,
            project_config=project,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    except (ValueError, ImportError) as err:
        raise TrainingError(f"cannot set up accelerate: {first_line(err)}") from err


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


def check_before_work(options: TrainingOptions) -> None:
    """Warn about flags this run ignores; refuse invalid adapter settings and an output or class folder that cannot
    be written (all cheap, before any image or model is read)."""
    for message in ignored_flags(options):
        logger.warning(message)
    try:
        get_backend(options.adapter.adapter).check(options.adapter)
    except AdapterError as err:
        raise TrainingError(str(err)) from err
    check_writable_folder(options.output.output_dir, "--output_dir")
    if options.output.report_to not in ("none", ""):
        check_writable_folder(Path(options.output.output_dir, options.output.logging_dir), "--logging_dir")
    if options.prior.with_prior_preservation:
        check_class_data_dir(options.prior.class_data_dir, options.prior.num_class_images)


def warn_truncated_prompts(options: TrainingOptions, components: SDXLComponents, dataset: DreamBoothDataset) -> None:
    """Warn once per prompt flag (and once for the captions) that the tokenizers cut short."""
    instance_prompt = options.data.instance_prompt
    captions = [r.prompt for r in dataset.instance_records if r.prompt != instance_prompt]
    prompts = {"--instance_prompt": [instance_prompt], "captions": captions}
    if options.prior.with_prior_preservation:
        prompts["--class_prompt"] = [options.prior.class_prompt]
    if options.output.validation_prompt:
        prompts["--validation_prompt"] = [options.output.validation_prompt]
    for message in truncation_warnings([components.tokenizer_one, components.tokenizer_two], prompts):
        logger.warning(message)


def prepare_models(
    options: TrainingOptions, backend: AdapterBackend, components: SDXLComponents, accelerator: Accelerator
) -> tuple[AdaptedModels, TrainableAdapters, torch.dtype]:
    """Place and cast the frozen models (VAE in fp32), then add the adapter (fp32 trainable parameters)."""
    optim, train_text_encoder = options.optim, options.adapter.train_text_encoder
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    components.vae.requires_grad_(False).to(device, dtype=torch.float32)
    for model in (components.unet, components.text_encoder_one, components.text_encoder_two):
        model.requires_grad_(False).to(device, dtype=weight_dtype)
    adapted = AdaptedModels(
        unet=components.unet,
        text_encoder_one=components.text_encoder_one if train_text_encoder else None,
        text_encoder_two=components.text_encoder_two if train_text_encoder else None,
    )
    if optim.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention needs xformers installed")
        components.unet.enable_xformers_memory_efficient_attention()
    trainable = add_adapters(backend, options.adapter, adapted, mixed_precision=weight_dtype != torch.float32)
    if optim.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            components.text_encoder_one.gradient_checkpointing_enable()
            components.text_encoder_two.gradient_checkpointing_enable()
    if optim.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    logger.info(f"{backend.kind}: {trainable.num_parameters:,} trainable parameters")
    return adapted, trainable, weight_dtype


def build_dataset(options: TrainingOptions, accelerator: Accelerator, seed: int) -> DreamBoothDataset:
    """Read the instance images (and class images, generating missing ones) into the dataset."""
    data, prior = options.data, options.prior
    if data.dataset_name is not None:
        instance = load_dataset_records(
            data.dataset_name,
            data.dataset_config_name,
            data.cache_dir,
            data.image_column,
            data.caption_column,
            data.instance_prompt,
            data.resolution,
        )
    else:
        instance = load_instance_records(
            data.instance_data_dir, data.instance_prompt, data.caption_column, data.resolution
        )
    class_records = None
    if prior.with_prior_preservation:
        ensure_class_images(accelerator, prior, options.model, data.resolution, seed)
        class_records = load_class_records(
            prior.class_data_dir, prior.class_prompt, prior.num_class_images, data.resolution
        )
    return DreamBoothDataset(
        instance,
        class_records,
        data.resolution,
        data.center_crop,
        data.random_flip,
        data.repeats,
        seed,
        data.image_interpolation_mode,
    )


def build_prompt_cache(
    train_text_encoder: bool, components: SDXLComponents, dataset: DreamBoothDataset, device: torch.device
) -> PromptCache | None:
    """With frozen text encoders, every prompt is encoded once up front."""
    if train_text_encoder:
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


def resume(updater: Updater, sampler: EpochShuffleSampler, path: Path, dataset: DreamBoothDataset) -> None:
    """Load a checkpoint. The run continues with the checkpoint's seed, so it replays the same randomness, and with
    this run's learning rates and optimizer settings; a warning names what differs from the checkpoint."""
    logger.info(f"resuming from {path}")
    state, scheduler = updater.state, updater.lr_scheduler.scheduler
    seed, wanted = state.seed, optimizer_settings(updater.optimizer, scheduler)
    try:
        updater.accelerator.load_state(str(path))
    except (OSError, KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise TrainingError(f"cannot resume from {path}: {first_line(err)}") from err
    if not all_finite(updater.parameters):
        raise TrainingError(
            f"cannot resume from {path}: its adapter weights are not finite; resume from an earlier one"
        )
    state.last_checkpoint = path
    if state.seed != seed:
        logger.warning(f"using the checkpoint's seed {state.seed} instead of {seed}")
        sampler.seed = dataset.seed = state.seed
    settings = restore_optimizer_settings(updater.optimizer, scheduler, wanted)
    if settings:
        logger.warning(f"{path} was trained with other optimizer settings; using this run's ({', '.join(settings)})")
    changes = run_layout_changes(state.saved_run_layout, state.run_layout)
    if changes:
        logger.warning(
            f"{path} was trained with another batch layout ({', '.join(changes)}): training goes on with the new "
            "one, but the result will differ from an uninterrupted run"
        )


def validation_settings(options: TrainingOptions) -> ValidationSettings:
    """The validation flags."""
    output = options.output
    return ValidationSettings(
        output.validation_prompt or "",
        output.num_validation_images,
        output.validation_seed,
        output.num_validation_inference_steps,
        options.data.resolution,
        output.output_dir,
    )


def finish(
    options: TrainingOptions,
    backend: AdapterBackend,
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
    output = options.output
    accelerator.wait_for_everyone()
    if not all_finite(parameters):
        raise TrainingError(f"the adapter weights are not finite at step {state.global_step}; nothing was written")
    weight_names = backend.output_names(options.adapter)
    folder = Path(output.output_dir)
    weight_file = folder / weight_names[0]

    def write() -> None:
        backend.write_outputs(folder, adapted.components(), options.adapter)

    error = agree_on_failure(attempt(write) if accelerator.is_main_process else None)
    if error is not None:
        needed = tensor_bytes(parameters) * len(weight_names)
        raise TrainingError(write_failure_message("the final weights", folder, error, needed, state.last_checkpoint))
    if accelerator.is_main_process:
        logger.info(f"saved {weight_file}")
        if output.validation_prompt and output.num_validation_images:
            final_validation(
                validation_settings(options),
                options.model,
                backend,
                accelerator,
                components,
                inference_scheduler,
                weight_dtype,
                state.seed,
                state.global_step,
            )
        logger.info(f"model card: {write_run_card(options)}")
        if output.push_to_hub:
            push_to_hub(options, weight_names)
    accelerator.wait_for_everyone()
    return weight_file


def run_training(options: TrainingOptions) -> Path:
    """Train and write output_dir/<adapter weights>; returns the path of the weight file."""
    model, data, prior, optim, output = options.model, options.data, options.prior, options.optim, options.output
    backend = get_backend(options.adapter.adapter)
    accelerator = make_accelerator(output, optim)
    configure_logging(accelerator)
    check_before_work(options)
    check_optimizer_backend(optim, accelerator.device)
    seed = shared_seed(accelerator, optim.seed)
    resume_from = resolve_resume_checkpoint(output.resume_from_checkpoint, output.output_dir)
    if resume_from is not None:
        check_resume_step(resume_from, checkpoint_step(resume_from), optim.max_train_steps)
    check_output_dir(output, resuming=resume_from is not None)
    dataset = build_dataset(options, accelerator, seed)
    components = load_components(
        model.pretrained_model_name_or_path, model.pretrained_vae_model_name_or_path, model.revision, model.variant
    )
    inference_scheduler = load_inference_scheduler(model.pretrained_model_name_or_path, model.revision)
    warn_truncated_prompts(options, components, dataset)
    adapted, trainable, weight_dtype = prepare_models(options, backend, components, accelerator)
    rates = scale_learning_rates(optim, accelerator.num_processes) if optim.scale_lr else optim
    groups = parameter_groups(rates, trainable.unet_parameters, trainable.text_encoder_parameters)
    optimizer = build_optimizer(rates, groups)
    sampler = EpochShuffleSampler(len(dataset), seed)
    dataloader = DataLoader(
        dataset,
        batch_size=optim.train_batch_size,
        sampler=sampler,
        collate_fn=collate_examples,
        num_workers=data.dataloader_num_workers,
    )
    train_text_encoder = options.adapter.train_text_encoder
    prompt_cache = build_prompt_cache(train_text_encoder, components, dataset, accelerator.device)
    if optim.cache_latents:
        cache_latents(dataset, components, accelerator.device, optim.train_batch_size)
    per_epoch = steps_per_epoch(len(dataloader), accelerator.num_processes, optim.gradient_accumulation_steps)
    max_train_steps = optim.max_train_steps or optim.num_train_epochs * per_epoch
    lr_scheduler = build_lr_scheduler(optim, optimizer, max_train_steps, accelerator.num_processes)

    models = list(adapted.components().values())
    *trained, optimizer, dataloader, lr_scheduler = accelerator.prepare(*models, optimizer, dataloader, lr_scheduler)
    text_encoders = trained[1:] if train_text_encoder else [components.text_encoder_one, components.text_encoder_two]
    layout = {
        "train_batch_size": optim.train_batch_size,
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
    }
    state = TrainState(seed, run_layout=layout)
    register_adapter_hooks(accelerator, backend, adapted)
    accelerator.register_for_checkpointing(state)
    trainable_parameters = trainable.unet_parameters + trainable.text_encoder_parameters
    if accelerator.is_main_process:
        if output.overwrite_output_dir:
            clear_output_dir(output)
        write_training_args(options)
        accelerator.init_trackers("dreambooth-lily", config=tracker_config(options))
    accelerator.wait_for_everyone()
    loss_step = LossStep(
        device=accelerator.device,
        components=components,
        unet=trained[0],
        text_encoders=text_encoders,
        prompt_cache=prompt_cache,
        weight_dtype=weight_dtype,
        resolution=data.resolution,
        noise_offset=optim.noise_offset,
        snr_gamma=optim.snr_gamma,
        prior_loss_weight=prior.prior_loss_weight if prior.with_prior_preservation else None,
    )
    updater = Updater(accelerator, optimizer, lr_scheduler, trainable_parameters, optim.max_grad_norm, state)
    schedule = Schedule(max_train_steps, per_epoch, optim.gradient_accumulation_steps)
    validate = make_validator(
        validation_settings(options), accelerator, components, inference_scheduler, weight_dtype, state
    )
    if resume_from is not None:
        resume(updater, sampler, resume_from, dataset)
        check_resume_step(resume_from, state.global_step, max_train_steps)
    logger.info(
        f"{len(dataset)} examples, {per_epoch} steps per epoch, {max_train_steps} steps, "
        f"batch {optim.train_batch_size} x {accelerator.num_processes} processes x "
        f"{optim.gradient_accumulation_steps} accumulation"
    )
    try:
        train(loss_step, updater, schedule, dataloader, sampler, trained, Periodic(output, validate))
        return finish(
            options,
            backend,
            accelerator,
            adapted,
            components,
            inference_scheduler,
            weight_dtype,
            state,
            trainable_parameters,
        )
    finally:
        # DDP's reducers hold the process group: drop them while every process still runs, so that the group is
        # torn down by end_training, not later by a reducer's destructor (gloo's can wait forever once a peer exited)
        trained.clear()
        del loss_step, updater
        accelerator.free_memory()
        accelerator.end_training()
