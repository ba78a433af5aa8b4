"""A `torch.compile`d UNet takes a Lily adapter by its original names, and `save_pretrained` of an adapted
pipeline writes the clean base weights."""

import copy

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open

from lily_diffusion import (
    LilyConfig,
    add_lily,
    lily_state_dict,
    load_lily_weights,
    remove_lily,
    save_lily_weights,
    unload_lily_weights,
)
from lily_diffusion.config import TEXT_ENCODER_TARGET_MODULES
from tests.helpers import run_unet, unet_inputs

CONFIG = LilyConfig(r=2, stride_A=2, num_B=2, init_weights=False)


def test_loading_into_a_compiled_unet_goes_by_the_original_names(unet, pipe, tmp_path):
    add_lily(unet, CONFIG)
    inputs = unet_inputs(2)
    expected = run_unet(unet, inputs)  # uncompiled, with Lily
    path = save_lily_weights(tmp_path, unet=unet)
    base = run_unet(pipe.unet, inputs)
    # aot_eager runs dynamo and AOT autograd as the default backend does; inductor only adds code generation
    # (it gives the same numbers, within 1.3e-6 here, but compiles for minutes on this CPU).
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    load_lily_weights(pipe, path)
    assert not any(key.startswith("_orig_mod.") for key in lily_state_dict(pipe.unet))
    assert lily_state_dict(pipe.unet).keys() == lily_state_dict(unet).keys()
    assert (run_unet(pipe.unet, inputs) - expected).abs().max() <= 1e-5
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output
    load_lily_weights(pipe.unet, path, adapter_name="again")  # the bare compiled module too
    assert sorted(pipe.unet._orig_mod.lily_adapters) == ["again", "default"]
    save_lily_weights(tmp_path / "again", unet=pipe.unet, adapter_name="again")
    unload_lily_weights(pipe.unet)
    assert not hasattr(pipe.unet._orig_mod, "lily_adapters")
    assert (run_unet(pipe.unet, inputs) - base).abs().max() <= 1e-5


def test_save_pretrained_writes_the_clean_base_weights(pipe, tiny_sdxl_dir, tmp_path):
    inputs = unet_inputs(2)
    base = run_unet(pipe.unet, inputs)
    add_lily(pipe.unet, CONFIG)
    add_lily(pipe.text_encoder, LilyConfig(r=2, num_B=2, target_modules=list(TEXT_ENCODER_TARGET_MODULES)))
    adapted = run_unet(pipe.unet, inputs)
    pipe.save_pretrained(tmp_path / "saved")
    for file in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        with safe_open(str(tmp_path / "saved" / file), framework="pt") as handle:
            keys = list(handle.keys())
        assert keys and not [key for key in keys if "lily" in key], file
    reloaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved")
    original = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert torch.equal(run_unet(reloaded.unet, inputs), base)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(reloaded, name).state_dict(), getattr(original, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert torch.equal(run_unet(pipe.unet, inputs), adapted)  # the adapted pipeline is untouched


def test_a_base_state_dict_loads_strictly_into_an_adapted_model(unet, tiny_sdxl_dir):
    adapter = add_lily(unet, CONFIG)
    inputs = unet_inputs(2)
    adapted = run_unet(unet, inputs)
    kept = [p.clone() for p in adapter.parameters()]
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet").state_dict()
    result = unet.load_state_dict(base, strict=True)  # no missing lily_adapters.* keys
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(a, b) for a, b in zip(adapter.parameters(), kept, strict=True))
    assert torch.equal(run_unet(unet, inputs), adapted)


def test_add_and_remove_on_a_compiled_model_use_the_original_names(unet):
    compiled = torch.compile(unet, backend="aot_eager")
    add_lily(compiled, CONFIG)
    assert "lily_adapters" in unet._modules and not any("_orig_mod" in key for key in lily_state_dict(unet))
    remove_lily(compiled)
    assert not hasattr(unet, "lily_adapters")
    assert all(type(m) is torch.nn.Linear for n, m in unet.named_modules() if n.endswith("to_q"))


def test_only_save_pretrained_leaves_the_adapter_out(unet, tmp_path):
    add_lily(unet, CONFIG)
    assert any(key.startswith("lily_adapters.") for key in unet.state_dict())  # offloading reads the weights here
    twin = copy.deepcopy(unet)
    assert twin.save_pretrained.__self__ is twin  # the copy saves itself
    twin.save_pretrained(tmp_path / "twin")
    with safe_open(str(tmp_path / "twin" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        keys = handle.keys()
    assert keys and not [key for key in keys if "lily" in key]
    remove_lily(unet)
    assert "save_pretrained" not in vars(unet)
