"""SDXL conditioning must equal what StableDiffusionXLPipeline computes at inference."""

from __future__ import annotations

import pytest
import torch

from lily_diffusion.training.conditioning import PromptCache, compute_time_ids, encode_prompts
from toyworld.tiny_sdxl import build_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl_pipeline(seed=0)


def test_prompt_embeddings_match_the_pipeline(pipe):
    prompts = ["a photo of sks dog", "a red circle on the white background"]
    embeds, pooled = encode_prompts(
        [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2], prompts, torch.device("cpu")
    )
    expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (2, 16, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)


def test_prompt_cache_returns_the_same_embeddings(pipe):
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    cache = PromptCache.build(encoders, tokenizers, ["a dog", "a cat", "a dog"], torch.device("cpu"))
    assert sorted(cache.table) == ["a cat", "a dog"]
    embeds, pooled = cache.lookup(["a cat", "a dog", "a cat"])
    with torch.no_grad():
        direct = encode_prompts(encoders, tokenizers, ["a cat", "a dog", "a cat"], torch.device("cpu"))
    torch.testing.assert_close(embeds, direct[0])
    torch.testing.assert_close(pooled, direct[1])
    with pytest.raises(KeyError, match="a bird"):
        cache.lookup(["a bird"])


def test_time_ids_are_original_size_crop_and_target():
    time_ids = compute_time_ids(
        torch.tensor([[1024, 768], [512, 512]]), torch.tensor([[0, 128], [16, 0]]), (1024, 1024),
        torch.device("cpu"), torch.float16,
    )  # fmt: skip
    assert time_ids.dtype == torch.float16
    assert time_ids.tolist() == [[1024, 768, 0, 128, 1024, 1024], [512, 512, 16, 0, 1024, 1024]]
