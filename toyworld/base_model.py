"""The toy world's base model: the components of a small `StableDiffusionXLPipeline`, built from configs.

Same classes and conditioning as SDXL (a text_time UNet with linear-projection transformers, a 4-channel
`AutoencoderKL`, `CLIPTextModel` + `CLIPTextModelWithProjection` with word-level `CLIPTokenizer`s, an Euler
scheduler), sized so that training from scratch fits in about half an hour on 2 CPU cores
(`scripts/train_toy_base.py`). Images are 32x32, latents 16x16x4.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import tiny_sdxl
from .render import EXTRA_COLOURS, SIZE, WORLD_WORDS
from .tiny_sdxl import DEFAULT_WORDS, build_tokenizer

# The base world's words, the subject's colours, and rare tokens for DreamBooth identifiers.
RARE_TOKENS: tuple[str, ...] = ("sks", "zwx", "ohwx")
VOCAB_WORDS: tuple[str, ...] = tuple(dict.fromkeys([*WORLD_WORDS, *EXTRA_COLOURS, *DEFAULT_WORDS, *RARE_TOKENS]))

TEXT_HIDDEN = 64
TEXT_PROJECTION = 64
TIME_EMBED = 16
MAX_TOKENS = 16
LATENT_SIZE = SIZE // 2

SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}


def build_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Two identical word-level CLIP tokenizers over `VOCAB_WORDS`."""
    return build_tokenizer(VOCAB_WORDS), build_tokenizer(VOCAB_WORDS)


def build_text_encoders(vocab_size: int, seed: int) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """Two small CLIP text encoders (2 layers, width 64); the second has the projection SDXL pools from."""
    return tiny_sdxl.build_text_encoders(
        vocab_size, seed, TEXT_HIDDEN, TEXT_PROJECTION, intermediate=4 * TEXT_HIDDEN, max_tokens=MAX_TOKENS
    )


def build_unet(seed: int, channels: tuple[int, int] = (64, 128)) -> UNet2DConditionModel:
    """An SDXL-type UNet on 16x16 latents: a plain level, then a cross-attention level."""
    return tiny_sdxl.build_unet(
        seed,
        sample_size=LATENT_SIZE,
        channels=channels,
        transformer_layers=(1, 1),
        head_dims=(8, 8),
        text_hidden=TEXT_HIDDEN,
        text_projection=TEXT_PROJECTION,
        time_embed=TIME_EMBED,
        norm_groups=16,
    )


def build_vae(seed: int) -> AutoencoderKL:
    """A small VAE with SDXL's latent layout: 4 channels at half the image resolution (32x32 -> 16x16)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
    )


def build_scheduler() -> EulerDiscreteScheduler:
    """The inference scheduler saved with the pipeline (training uses the same betas)."""
    return EulerDiscreteScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    unet: UNet2DConditionModel,
) -> StableDiffusionXLPipeline:
    """The full pipeline from trained components (fresh tokenizers and scheduler, no watermarker)."""
    tokenizer, tokenizer_2 = build_tokenizers()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(),
        add_watermarker=False,
    )
