"""An SDXL pipeline folder with the exact configs of `stabilityai/stable-diffusion-xl-base-1.0` and random weights.

    python -m toyworld.full_sdxl /tmp/sdxl-random            # the real sizes, fp16 files (variant "fp16")
    python -m toyworld.full_sdxl /tmp/sdxl-small --divisor 16 --dtype fp32

Every component has the class and config of the release: the UNet, CLIP ViT-L and OpenCLIP bigG text encoders
(the second with its projection), the VAE (4 latent channels, 8x downsampling), the EulerDiscrete scheduler config,
and CLIP tokenizers of CLIP's vocabulary size (49408) and length (77), built offline from a generated vocabulary
(the 512 byte tokens, merges that make the prompt words of the toy world whole tokens, filler merges, and the two
special tokens last, where CLIP has them). `divisor` divides every width (channels, hidden sizes, embeddings) and
keeps every depth, head count, vocabulary and the VAE's scale factor: the same architecture family, small and fast,
for tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .sdxl_config import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    SDXL_BASE_SCHEDULER_CONFIG,
    SDXL_BASE_TEXT_ENCODER_2_CONFIG,
    SDXL_BASE_TEXT_ENCODER_CONFIG,
    SDXL_BASE_UNET_CONFIG,
    SDXL_BASE_VAE_CONFIG,
)
from .tiny_sdxl import DEFAULT_WORDS

DIVISORS = (1, 2, 4, 8, 16, 32)  # every width of the release is a multiple of 64 x the head count
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
FP16_VARIANT = "fp16"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class SDXLConfigs:
    """The four model configs of one build."""

    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    vae: dict[str, Any]


def sdxl_configs(divisor: int = 1) -> SDXLConfigs:
    """The release's configs with every width divided by `divisor` (1: exact); depths and head counts kept."""
    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {DIVISORS}, got {divisor!r}")
    unet, vae = dict(SDXL_BASE_UNET_CONFIG), dict(SDXL_BASE_VAE_CONFIG)
    text_encoder, text_encoder_2 = dict(SDXL_BASE_TEXT_ENCODER_CONFIG), dict(SDXL_BASE_TEXT_ENCODER_2_CONFIG)
    if divisor == 1:
        return SDXLConfigs(unet, text_encoder, text_encoder_2, vae)
    for config in (text_encoder, text_encoder_2):
        for key in ("hidden_size", "intermediate_size", "projection_dim"):
            config[key] //= divisor
    channels = [c // divisor for c in unet["block_out_channels"]]
    time_embed = unet["addition_time_embed_dim"] // divisor
    unet.update(
        block_out_channels=channels,
        cross_attention_dim=text_encoder["hidden_size"] + text_encoder_2["hidden_size"],
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + text_encoder_2["projection_dim"],
        norm_num_groups=math.gcd(unet["norm_num_groups"], channels[0]),
    )
    vae_channels = [c // divisor for c in vae["block_out_channels"]]
    vae.update(block_out_channels=vae_channels, norm_num_groups=math.gcd(vae["norm_num_groups"], vae_channels[0]))
    return SDXLConfigs(unet, text_encoder, text_encoder_2, vae)


def build_clip_tokenizer(pad_token: str = SPECIAL_TOKENS[1], words: Sequence[str] = DEFAULT_WORDS) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer with CLIP's vocabulary size and length, made offline.

    Ids 0-511 are the byte tokens (alone and word-final, in CLIP's order), then merges that make every word of
    `words` one token, then filler merges of two bytes up to 49406, then <|startoftext|> and <|endoftext|>.
    """
    alphabet = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges: list[tuple[str, str]] = []
    wanted = CLIP_VOCAB_SIZE - len(SPECIAL_TOKENS) - len(vocab)

    def merge(left: str, right: str) -> None:
        if left + right not in vocab and len(merges) < wanted:
            merges.append((left, right))
            vocab[left + right] = len(vocab)

    for word in dict.fromkeys(words):
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:  # left to right: the whole word becomes one token
            merge(pieces[0], pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    for left, right in itertools.product(alphabet, alphabet):
        if len(merges) == wanted:
            break
        merge(left, right + "</w>")
        merge(left, right)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built {len(vocab)} tokens instead of {CLIP_VOCAB_SIZE}")
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in `dtype` directly (half the memory of building in fp32 and casting)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_full_sdxl_pipeline(
    divisor: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32
) -> StableDiffusionXLPipeline:
    """The pipeline with random weights (diffusers' and transformers' own initialisation), seeded."""
    configs = sdxl_configs(divisor)
    torch.manual_seed(seed)
    with default_dtype(dtype):
        unet = UNet2DConditionModel(**configs.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs.text_encoder))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs.text_encoder_2))
        vae = AutoencoderKL(**configs.vae)
    scheduler_config = {k: v for k, v in SDXL_BASE_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),  # the release pads its second tokenizer with "!"
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
    )


def save_full_sdxl(folder: Path, divisor: int = 1, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Build and `save_pretrained` into `folder` (fp16 weights as variant "fp16"); returns the folder.

    The scheduler config is then written as released, keys EulerDiscreteScheduler ignores included."""
    pipeline = build_full_sdxl_pipeline(divisor, seed, dtype)
    variant = FP16_VARIANT if dtype == torch.float16 else None
    pipeline.save_pretrained(folder, variant=variant, safe_serialization=True)
    del pipeline
    (Path(folder) / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SDXL_BASE_SCHEDULER_CONFIG, indent=2) + "\n"
    )
    return Path(folder)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def parameter_counts(pipeline: StableDiffusionXLPipeline) -> dict[str, int]:
    """Parameters of the UNet, the two text encoders and the VAE."""
    names = ("unet", "text_encoder", "text_encoder_2", "vae")
    return {name: sum(p.numel() for p in getattr(pipeline, name).parameters()) for name in names}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to save the pipeline (must not exist)")
    parser.add_argument("--divisor", type=int, default=1, choices=DIVISORS, help="divide every width by this")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weights (fp16: variant 'fp16')")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.folder.exists():
        parser.error(f"{args.folder} exists; give a new folder")
    save_full_sdxl(args.folder, args.divisor, args.seed, DTYPES[args.dtype])
    print(f"{args.folder}: {folder_bytes(args.folder):,} bytes")
    return args.folder


if __name__ == "__main__":
    main(sys.argv[1:])
