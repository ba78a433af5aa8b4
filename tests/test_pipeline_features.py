"""Lily under diffusers' pipeline features: the LoRA scale, LoRA in either order, fused q/k/v, offloading.

Each feature either works exactly (compared with the plain path, or layer by layer with deltas
computed separately) or is refused; none may silently drop the adapter.
"""

import accelerate
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lily_diffusion import (
    add_lily,
    load_lily_weights,
    remove_lily,
    save_lily_weights,
    set_lily_scale,
    unload_lily_weights,
)
from lily_diffusion.features import LilyFusedLinear
from tests.helpers import TEXT_CONFIG, UNET_CONFIG, unet_inputs
from tests.helpers import generate_tiny as generate
from tests.layer_probe import base_output, lily_delta, lora_delta, recorded_layers

LORA_CONFIG = LoraConfig(
    r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
)


def fresh(tiny_sdxl_dir) -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def lily_file(pipe, tmp_path):
    """A Lily adapter with non-zero weights on the unet and both text encoders, saved."""
    add_lily(pipe.unet, UNET_CONFIG)
    add_lily(pipe.text_encoder, TEXT_CONFIG)
    add_lily(pipe.text_encoder_2, TEXT_CONFIG)
    return save_lily_weights(
        tmp_path / "lily", unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2
    )


@pytest.fixture
def lora_dir(tiny_sdxl_dir, tmp_path):
    """A diffusers LoRA (non-zero) for the unet, saved with `save_lora_weights`."""
    source = fresh(tiny_sdxl_dir)
    source.unet.add_adapter(LORA_CONFIG)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(source.unet)
    )
    return tmp_path / "lora"


def max_layer_error(unet, expected_delta) -> tuple[float, int]:
    """Run the unet; the largest |output - (W x + b + expected_delta(path, x))| over every adapted layer call."""
    paths = list(unet.lily_adapters["default"].layers)
    with recorded_layers(unet, paths) as records, torch.no_grad():
        unet(**unet_inputs(2), cross_attention_kwargs=expected_delta.kwargs)
    errors = [
        (output - base_output(unet, path, x) - expected_delta(path, x)).abs().max().item()
        for path, calls in records.items()
        for x, output in calls
    ]
    return max(errors), len(errors)


class Delta:
    """The separately computed delta a layer should add: `scale * (lily + lora)`."""

    def __init__(self, unet, scale: float | None = None, lora: bool = False) -> None:
        self.unet, self.scale, self.lora = unet, scale, lora
        self.kwargs = None if scale is None else {"scale": scale}

    def __call__(self, path: str, x: torch.Tensor) -> torch.Tensor:
        delta = lily_delta(self.unet, path, x, "default")
        if self.lora and hasattr(self.unet.get_submodule(path), "lora_A"):
            delta = delta + lora_delta(self.unet, path, x)
        return delta * (1.0 if self.scale is None else self.scale)


# --- cross_attention_kwargs={"scale": s} -----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 0.0, 1.7])
def test_the_call_scale_multiplies_every_unet_layer_delta(unet, scale):
    add_lily(unet, UNET_CONFIG)
    worst, calls = max_layer_error(unet, Delta(unet, scale))
    assert calls > 0 and worst < 1e-5


def test_the_call_scale_reaches_text_encoders_and_zero_gives_the_base_pipeline(lily_file, tiny_sdxl_dir):
    pipeline = fresh(tiny_sdxl_dir)
    base = generate(pipeline)
    load_lily_weights(pipeline, lily_file)
    full = generate(pipeline)
    half = generate(pipeline, cross_attention_kwargs={"scale": 0.5})
    assert (generate(pipeline, cross_attention_kwargs={"scale": 0.0}) - base).abs().max() < 1e-5
    assert torch.equal(generate(pipeline), full)  # the call scale does not outlive the call
    set_lily_scale(pipeline, 0.5)  # the same multiplier, set on every adapter (unet and text encoders)
    assert (half - generate(pipeline)).abs().max() < 1e-5
    assert (half - full).abs().max() > 1e-3


def test_a_bad_call_scale_is_refused_before_any_output(lily_file, tiny_sdxl_dir):
    pipeline = fresh(tiny_sdxl_dir)
    load_lily_weights(pipeline, lily_file)
    with pytest.raises(ValueError, match=r"cross_attention_kwargs\['scale'\]\) must be a finite number"):
        generate(pipeline, cross_attention_kwargs={"scale": float("nan")})


# --- diffusers/peft LoRA and Lily in either order ----------------------------------------------------------------


@pytest.mark.parametrize("lily_first", [True, False])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_lora_and_lily_add_both_deltas_in_either_load_order(unet, lily_first, scale):
    if lily_first:
        add_lily(unet, UNET_CONFIG)
        unet.add_adapter(LORA_CONFIG)
    else:
        unet.add_adapter(LORA_CONFIG)
        add_lily(unet, UNET_CONFIG)
    worst, calls = max_layer_error(unet, Delta(unet, scale, lora=True))
    assert calls > 0 and worst < 1e-5


def test_pipeline_lora_and_lily_in_either_order_and_each_removed_alone(lily_file, lora_dir, tiny_sdxl_dir):
    lily_only = fresh(tiny_sdxl_dir)
    load_lily_weights(lily_only, lily_file)
    lora_only = fresh(tiny_sdxl_dir)
    lora_only.load_lora_weights(lora_dir)
    lily_then_lora, lora_then_lily = fresh(tiny_sdxl_dir), fresh(tiny_sdxl_dir)
    load_lily_weights(lily_then_lora, lily_file)
    lily_then_lora.load_lora_weights(lora_dir)
    lora_then_lily.load_lora_weights(lora_dir)
    load_lily_weights(lora_then_lily, lily_file)

    both = generate(lily_then_lora)
    assert (generate(lora_then_lily) - both).abs().max() < 1e-5
    assert (both - generate(lily_only)).abs().max() > 1e-3 and (both - generate(lora_only)).abs().max() > 1e-3
    lora_then_lily.fuse_lora()  # LoRA merges into W; Lily stays a separate layer and still applies
    assert (generate(lora_then_lily) - both).abs().max() < 1e-5
    lora_then_lily.unfuse_lora()
    assert (generate(lora_then_lily) - both).abs().max() < 1e-5
    lily_then_lora.set_adapters("default_0", adapter_weights=0.0)  # diffusers' LoRA weights leave Lily alone
    assert (generate(lily_then_lora) - generate(lily_only)).abs().max() < 1e-5
    lily_then_lora.set_adapters("default_0", adapter_weights=1.0)
    assert (generate(lily_then_lora) - both).abs().max() < 1e-5
    lily_then_lora.unload_lora_weights()  # takes LoRA out, leaves Lily in
    assert (generate(lily_then_lora) - generate(lily_only)).abs().max() < 1e-5
    unload_lily_weights(lora_then_lily)  # takes Lily out, leaves LoRA in
    assert (generate(lora_then_lily) - generate(lora_only)).abs().max() < 1e-5


# --- fused q/k/v, attention processors, slicing, VAE tiling ----------------------------------------------------


@pytest.mark.parametrize("fuse_first", [False, True])
def test_fused_qkv_projections_keep_the_q_k_v_adapters(lily_file, tiny_sdxl_dir, fuse_first):
    plain = fresh(tiny_sdxl_dir)
    load_lily_weights(plain, lily_file)
    expected = generate(plain)
    pipeline = fresh(tiny_sdxl_dir)
    if fuse_first:
        pipeline.fuse_qkv_projections()
    load_lily_weights(pipeline, lily_file)
    if not fuse_first:
        pipeline.fuse_qkv_projections()
    assert (generate(pipeline) - expected).abs().max() < 1e-5
    fused = [m for m in pipeline.unet.modules() if isinstance(m, LilyFusedLinear)]
    assert fused and {m.parts for m in fused} == {("to_q", "to_k", "to_v"), ("to_k", "to_v")}
    pipeline.unfuse_qkv_projections()
    assert (generate(pipeline) - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "feature",
    [
        lambda p: p.unet.set_attn_processor(AttnProcessor()),
        lambda p: p.enable_attention_slicing(1),
        lambda p: (p.vae.enable_slicing(), p.vae.enable_tiling()),
    ],
    ids=["set_attn_processor", "attention_slicing", "vae_slicing_tiling"],
)
def test_attention_and_vae_features_leave_lily_exact(lily_file, tiny_sdxl_dir, feature):
    pipeline = fresh(tiny_sdxl_dir)
    load_lily_weights(pipeline, lily_file)
    expected = generate(pipeline)
    feature(pipeline)
    assert (generate(pipeline) - expected).abs().max() < 1e-5


def test_freeu_changes_the_features_but_every_lily_layer_stays_exact(unet):
    add_lily(unet, UNET_CONFIG)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    worst, calls = max_layer_error(unet, Delta(unet))
    assert calls > 0 and worst < 1e-5


# --- offloading ----------------------------------------------------------------------------------------------


def test_sequential_offload_hooks_bring_the_adapter_along(lily_file, tiny_sdxl_dir):
    pipeline = fresh(tiny_sdxl_dir)
    load_lily_weights(pipeline, lily_file)
    expected = generate(pipeline)
    accelerate.cpu_offload(pipeline.unet, execution_device=torch.device("cpu"))
    adapter = pipeline.unet.lily_adapters["default"]
    assert adapter.lily_A[0].device.type == "meta"  # offloaded like the unet's own weights
    assert (generate(pipeline) - expected).abs().max() < 1e-5
    assert adapter.lily_A[0].device.type == "meta"  # and offloaded again after the forward


def test_model_cpu_offload(lily_file, tiny_sdxl_dir):
    pipeline = fresh(tiny_sdxl_dir)
    load_lily_weights(pipeline, lily_file)
    expected = generate(pipeline)
    pipeline.enable_model_cpu_offload(device="cpu")
    assert (generate(pipeline) - expected).abs().max() < 1e-5


def test_removing_lily_from_a_lora_wrapped_layer_restores_the_plain_linear(unet):
    unet.add_adapter(LORA_CONFIG)
    layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    original = layer.base_layer
    add_lily(unet, UNET_CONFIG)
    assert type(layer.base_layer).__name__ == "LilyLinear"
    remove_lily(unet)
    assert layer.base_layer is original
