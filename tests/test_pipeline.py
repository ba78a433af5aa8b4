import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from lily_diffusion import (
    LilyFileError,
    add_lily,
    load_lily_weights,
    save_lily_weights,
    set_lily_scale,
    unload_lily_weights,
)
from tests.helpers import TEXT_CONFIG, UNET_CONFIG
from tests.helpers import generate_tiny as generate


def encode(pipe: StableDiffusionXLPipeline) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return pipe.encode_prompt("a photo of sks star", do_classifier_free_guidance=False)[::2]


@pytest.fixture
def trained_file(pipe, tmp_path):
    """An adapter with non-zero weights on the unet and both text encoders, saved."""
    add_lily(pipe.unet, UNET_CONFIG)
    add_lily(pipe.text_encoder, TEXT_CONFIG)
    add_lily(pipe.text_encoder_2, TEXT_CONFIG)
    path = save_lily_weights(
        tmp_path / "adapter", unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2
    )
    return path, generate(pipe), encode(pipe)


def test_round_trip_into_a_fresh_pipeline(trained_file, tiny_sdxl_dir):
    path, expected_images, expected_embeddings = trained_file
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    fresh.set_progress_bar_config(disable=True)
    base_images = generate(fresh)
    load_lily_weights(fresh, path.parent)
    for got, want in zip(encode(fresh), expected_embeddings, strict=True):
        assert torch.equal(got, want)
    images = generate(fresh)
    assert torch.equal(images, expected_images)
    assert torch.isfinite(images).all()
    assert (images - base_images).abs().max() > 1e-3  # the adapter really changes generation
    unload_lily_weights(fresh)
    assert torch.equal(generate(fresh), base_images)


def test_loading_again_under_the_same_name_replaces_the_adapter(trained_file, tiny_sdxl_dir):
    path, expected_images, _ = trained_file
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    fresh.set_progress_bar_config(disable=True)
    load_lily_weights(fresh, path, scale=0.3)
    load_lily_weights(fresh, path)
    assert list(fresh.unet.lily_adapters) == ["default"]
    layer = next(iter(fresh.unet.lily_adapters["default"].layers.values()))
    assert list(layer.adapters) == ["default"]
    assert torch.equal(generate(fresh), expected_images)


def test_scale_at_load_time_matches_set_lily_scale(trained_file, tiny_sdxl_dir):
    path, _, _ = trained_file
    first = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    second = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    load_lily_weights(first, path, scale=0.5)
    load_lily_weights(second, path)
    set_lily_scale(second, 0.5)
    assert torch.equal(generate(first), generate(second))


def test_bare_model_needs_a_component_when_the_file_has_several(trained_file, tiny_sdxl_dir):
    path, _, _expected_embeddings = trained_file
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    with pytest.raises(ValueError, match=r"pass component=\.\.\. to pick one"):
        load_lily_weights(fresh.unet, path)
    load_lily_weights(fresh.text_encoder_2, path, component="text_encoder_2")
    with torch.no_grad():
        pooled = fresh.text_encoder_2(fresh.tokenizer_2("a photo of sks star", return_tensors="pt").input_ids)
    assert pooled.text_embeds.shape == (1, 32)


def test_a_bad_component_leaves_the_whole_pipeline_untouched(trained_file, tiny_sdxl_dir, tmp_path):
    path, _, _ = trained_file
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in list(handle.keys())}
        metadata = handle.metadata()
    key = next(k for k in tensors if k.startswith("text_encoder_2.") and k.endswith("lily_A.weight"))
    tensors[key] = torch.zeros(2, 7)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    fresh.set_progress_bar_config(disable=True)
    before = generate(fresh)
    with pytest.raises(LilyFileError, match=r"text_encoder_2 adapter was saved for a model of other widths"):
        load_lily_weights(fresh, broken)
    for component in (fresh.unet, fresh.text_encoder, fresh.text_encoder_2):
        assert not hasattr(component, "lily_adapters")
    assert torch.equal(generate(fresh), before)


def test_file_with_a_component_the_pipeline_lacks(trained_file, tiny_sdxl_dir):
    path, _, _ = trained_file
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, text_encoder=None, tokenizer=None)
    with pytest.raises(ValueError, match=r"adapters for \['text_encoder'\], which this pipeline does not have"):
        load_lily_weights(fresh, path)
    assert not hasattr(fresh.unet, "lily_adapters")
