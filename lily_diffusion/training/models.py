"""Loading the SDXL components for training, with a clear error when the folder is not an SDXL pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from ..messages import first_line
from .errors import TrainingError

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class SDXLComponents:
    """Everything the training loop needs from the base pipeline."""

    tokenizer_one: PreTrainedTokenizerBase
    tokenizer_two: PreTrainedTokenizerBase
    text_encoder_one: CLIPTextModel
    text_encoder_two: CLIPTextModelWithProjection
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or Path(name).exists()


def check_sdxl_folder(name_or_path: str) -> None:
    """For a local folder: it must hold an SDXL pipeline (model_index.json and the seven components)."""
    if not _looks_like_path(name_or_path):
        return  # a hub id: from_pretrained checks it
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        raise TrainingError(f"--pretrained_model_name_or_path {name_or_path} does not exist")
    index = folder / "model_index.json"
    if not index.is_file():
        raise TrainingError(f"{name_or_path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError) as err:
        raise TrainingError(f"{index} is not valid JSON") from err
    missing = [c for c in SDXL_COMPONENTS if not (folder / c).is_dir()]
    if missing or "XL" not in str(class_name):
        detail = f"missing {', '.join(missing)}" if missing else f"it is a {class_name}"
        raise TrainingError(f"{name_or_path} is not an SDXL pipeline ({detail})")


def load_components(model: str, vae_model: str | None, revision: str | None, variant: str | None) -> SDXLComponents:
    """Load tokenizers, text encoders, VAE, UNet and a DDPM noise scheduler from an SDXL pipeline."""
    check_sdxl_folder(model)
    try:
        components = SDXLComponents(
            tokenizer_one=AutoTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision),
            tokenizer_two=AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2", revision=revision),
            text_encoder_one=CLIPTextModel.from_pretrained(
                model, subfolder="text_encoder", revision=revision, variant=variant
            ),
            text_encoder_two=CLIPTextModelWithProjection.from_pretrained(
                model, subfolder="text_encoder_2", revision=revision, variant=variant
            ),
            vae=AutoencoderKL.from_pretrained(
                vae_model or model,
                subfolder=None if vae_model else "vae",
                revision=revision,
                variant=None if vae_model else variant,
            ),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", revision=revision, variant=variant),
            noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision),
        )
    except TrainingError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise TrainingError(f"cannot load an SDXL pipeline from {model}: {first_line(err)}") from err
    check_sdxl_unet(components)
    return components


def check_sdxl_unet(components: SDXLComponents) -> None:
    """The UNet must take SDXL's text_time conditioning sized for these text encoders."""
    config = components.unet.config
    if config.addition_embed_type != "text_time":
        raise TrainingError("the UNet is not an SDXL UNet (addition_embed_type is not 'text_time')")
    expected = 6 * config.addition_time_embed_dim + components.text_encoder_two.config.projection_dim
    actual = components.unet.add_embedding.linear_1.in_features
    if actual != expected:
        raise TrainingError(
            f"the UNet expects {actual} added-conditioning features, the text encoders give {expected}"
        )
    width = components.text_encoder_one.config.hidden_size + components.text_encoder_two.config.hidden_size
    if config.cross_attention_dim != width:
        raise TrainingError(f"the UNet's cross_attention_dim {config.cross_attention_dim} != text width {width}")


def load_inference_scheduler(model: str, revision: str | None) -> SchedulerMixin:
    """The pipeline's own scheduler class (e.g. EulerDiscreteScheduler), for validation and class images."""
    config = DDPMScheduler.load_config(model, subfolder="scheduler", revision=revision)
    scheduler_class = getattr(diffusers, str(config.get("_class_name", "")), None)
    if scheduler_class is None or not issubclass(scheduler_class, SchedulerMixin):
        scheduler_class = diffusers.EulerDiscreteScheduler
    return scheduler_class.from_config(config)
