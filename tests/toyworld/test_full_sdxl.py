"""toyworld.full_sdxl: the release's configs and sizes, offline CLIP tokenizers, an fp16 folder loaded in fp32."""

import json

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline

from toyworld.full_sdxl import (
    build_clip_tokenizer,
    build_full_sdxl_pipeline,
    folder_bytes,
    parameter_counts,
    save_full_sdxl,
    sdxl_configs,
)
from toyworld.sdxl_config import SDXL_BASE_SCHEDULER_CONFIG, SDXL_BASE_UNET_CONFIG

# The published parameter counts of stabilityai/stable-diffusion-xl-base-1.0.
RELEASE_PARAMETERS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863}  # fmt: skip


def test_exact_configs_give_the_release_parameter_counts():
    with init_empty_weights():
        pipeline = build_full_sdxl_pipeline(divisor=1)
    assert parameter_counts(pipeline) == RELEASE_PARAMETERS
    assert sdxl_configs(1).unet == SDXL_BASE_UNET_CONFIG
    assert pipeline.vae_scale_factor == 8 and pipeline.text_encoder_2.config.projection_dim == 1280


@pytest.mark.parametrize("divisor", [2, 16, 32])
def test_divided_configs_stay_consistent(divisor):
    configs = sdxl_configs(divisor)
    assert configs.unet["cross_attention_dim"] == 2048 // divisor
    assert configs.unet["projection_class_embeddings_input_dim"] == 2816 // divisor
    assert configs.unet["transformer_layers_per_block"] == [1, 2, 10]  # depths kept
    assert (configs.text_encoder["num_hidden_layers"], configs.text_encoder_2["num_hidden_layers"]) == (12, 32)
    assert len(configs.vae["block_out_channels"]) == 4  # the VAE still downsamples by 8


def test_tokenizers_have_clips_vocabulary_size_length_and_special_ids():
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer_2.pad_token_id == 0  # "!" as in the release
    ids = tokenizer("a photo of sks dog").input_ids
    assert len(ids) == 7 and ids[0] == 49406 and ids[-1] == 49407  # every word is one token
    assert len(tokenizer("xyz qqq " * 40, truncation=True, max_length=77).input_ids) == 77


def test_an_fp16_folder_loads_in_fp32_and_generates(tmp_path):
    folder = save_full_sdxl(tmp_path / "sdxl", divisor=32, dtype=torch.float16)
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == SDXL_BASE_SCHEDULER_CONFIG
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert folder_bytes(folder) > 2 * sum(parameter_counts(build_full_sdxl_pipeline(32)).values())
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.vae.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
