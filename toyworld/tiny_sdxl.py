"""A tiny pipeline of the SDXL architecture, built from configs with random weights.

Used by the tests, the benchmarks and the examples: no hub, no download. Every component has the
same class and conditioning as `stabilityai/stable-diffusion-xl-base-1.0` (text_time added
embeddings, two CLIP text encoders, the second with a projection), only narrower.
"""

from __future__ import annotations

import itertools

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

DEFAULT_WORDS: tuple[str, ...] = tuple(
    "a photo of sks star circle square triangle red green blue yellow white black gray "
    "on the background with stripes striped dog cat".split()
)

TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED = 8


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as CLIP's tokenizer does it: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def build_tokenizer(words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> CLIPTokenizer:
    """A word-level CLIP tokenizer over `words` (every word one token, plus the special tokens)."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for token in specials + chars + [c + "</w>" for c in chars] + [w + "</w>" for w in dict.fromkeys(words)]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        # Merge what the earlier words' merges leave, with merges ranked after all of theirs: every whole word
        # becomes a single token, and no earlier word's tokenization changes.
        pieces = _bpe([*list(word[:-1]), word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _bpe(pieces, ranks)
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=16)


def build_text_encoders(
    vocab_size: int,
    seed: int = 0,
    hidden: int = TEXT_HIDDEN,
    projection: int = TEXT_PROJECTION,
    intermediate: int = 37,
    max_tokens: int = 16,
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """Two small CLIP text encoders (2 layers, 4 heads); the second has the projection SDXL pools from."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_tokens,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=projection, **common))
    return text_encoder, text_encoder_2


def build_unet(
    seed: int = 0,
    sample_size: int = 8,
    channels: tuple[int, int] = (32, 64),
    transformer_layers: tuple[int, int] = (1, 2),
    head_dims: tuple[int, int] = (2, 4),
    text_hidden: int = TEXT_HIDDEN,
    text_projection: int = TEXT_PROJECTION,
    time_embed: int = TIME_EMBED,
    norm_groups: int = 8,
) -> UNet2DConditionModel:
    """SDXL-type UNet: text_time conditioning, a plain level then a cross-attention level.

    The cross-attention width is both text encoders' hidden size, the added-embedding input six
    time embeddings plus the pooled projection, as in SDXL.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=transformer_layers,
        attention_head_dim=head_dims,
        cross_attention_dim=2 * text_hidden,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + text_projection,
        norm_num_groups=norm_groups,
    )


def build_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny VAE with the SDXL latent layout (4 channels, 1/2 resolution here)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def build_tiny_sdxl_pipeline(
    seed: int = 0, words: tuple[str, ...] | list[str] = DEFAULT_WORDS
) -> StableDiffusionXLPipeline:
    """The whole tiny pipeline: 16x16 images, 8x8 latents."""
    tokenizer = build_tokenizer(words)
    text_encoder, text_encoder_2 = build_text_encoders(len(tokenizer), seed)
    return StableDiffusionXLPipeline(
        vae=build_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(words),
        unet=build_unet(seed),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
        ),
    )
