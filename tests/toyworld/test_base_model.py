"""The committed toy base model: small fp32 safetensors, real SDXL classes, loads and follows prompts."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from toyworld.base_model import VOCAB_WORDS, build_tokenizers
from toyworld.evaluate import ToyEvaluator
from toyworld.prompts import generate
from toyworld.render import BACKGROUNDS, COLOURS, SHAPES

MODEL = Path(__file__).resolve().parents[2] / "assets" / "toy-sdxl-base"
# Measured on this model at 10 steps: every attribute 8/8 for seeds 0-7 and for each of 9 further groups of 8
# seeds (1.000 on 64 generations at 25 steps, benchmarks/results/toy_base.md); the bound allows one miss in 8.
MIN_ACCURACY = 0.875


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_folder_is_small_fp32_safetensors_without_variants():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40_000_000
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert not [p for p in files if p.suffix in (".bin", ".pt") or ".fp16." in p.name]
    for path in weights:
        with safe_open(path, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}, path  # noqa: SIM118
    assert json.loads((MODEL / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_components_have_the_sdxl_architecture(pipe):
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time" and config.use_linear_projection
    assert config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.vae.config.latent_channels == 4
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert tokenizer.tokenize("a photo of sks star on a gray background") == [
            w + "</w>" for w in "a photo of sks star on a gray background".split()
        ]


def test_every_world_word_is_one_token_and_every_caption_fits(pipe):
    """Words split into pieces would push the longest captions past the encoders' 16 tokens (then truncated)."""
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert all(tokenizer.tokenize(word) == [word + "</w>"] for word in VOCAB_WORDS)
        longest = "a photo of a yellow and green striped triangle on a white background"
        assert len(tokenizer(longest).input_ids) <= tokenizer.model_max_length == 16
    assert build_tokenizers()[0].get_vocab() == pipe.tokenizer.get_vocab()


def test_generates_what_the_prompt_asks_for(pipe):
    evaluator = ToyEvaluator.load()
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    prompts = [
        f"a photo of a {colours[(k + k // 4) % 4]} {SHAPES[k % 4]} on a {backgrounds[k % 3]} background"
        for k in range(8)
    ]  # every shape and colour twice, every background two or three times
    images = generate(pipe, prompts, seeds=range(8), num_inference_steps=10)
    assert len(images) == 8 and images[0].size == (32, 32)
    scores = evaluator.prompt_fidelity(images, prompts)
    assert min(scores.values()) >= MIN_ACCURACY, scores


def test_class_prompt_gives_plain_stars_not_the_subject(pipe):
    evaluator = ToyEvaluator.load()
    images = generate(pipe, ["a photo of a star"] * 8, seeds=range(1000, 1008), num_inference_steps=10)
    assert evaluator.subject_probability(images).max() < 0.5
    # Measured: 7/8 plain stars for these seeds (61/64 over seeds 1000-1063) at 10 steps, 16/16 at 25 steps.
    assert evaluator.class_preservation(images) >= 0.75
