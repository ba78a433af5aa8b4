"""Loading files written by strangers: non-finite tensors and absurd scales are refused before anything loads.

Every refused load must leave the pipeline exactly as it was: no adapter, the same images.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LilyConfig as PeftLilyConfig
from peft import get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lily_diffusion import (
    LilyConfig,
    LilyFileError,
    add_lily,
    import_peft_lily,
    load_lily_weights,
    save_lily_weights,
    set_lily_scale,
)
from lily_diffusion.config import TEXT_ENCODER_TARGET_MODULES
from lily_diffusion.serialization import CONFIG_KEY_PREFIX, LilyComponentWeights, check_fits, expected_shapes
from lily_diffusion.sharing import build_layout
from tests.helpers import run_unet, unet_inputs


def generate(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of sks star", num_inference_steps=2, height=16, width=16, generator=generator,
                output_type="pt").images  # fmt: skip


@pytest.fixture
def saved(pipe, tmp_path):
    """A file with non-zero adapters on the unet and on text_encoder_2."""
    add_lily(pipe.unet, LilyConfig(r=4, stride_A=2, num_B=3, init_weights=False))
    text_config = LilyConfig(r=2, num_B=2, init_weights=False, target_modules=list(TEXT_ENCODER_TARGET_MODULES))
    add_lily(pipe.text_encoder_2, text_config)
    return save_lily_weights(tmp_path / "adapter", unet=pipe.unet, text_encoder_2=pipe.text_encoder_2)


@pytest.fixture
def fresh(tiny_sdxl_dir):
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def edited_copy(path, target, tensors=None, configs=None):
    """`path` rewritten with some tensors replaced and some component configs changed (as JSON dicts)."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    all_tensors = {**load_file(str(path)), **(tensors or {})}
    for component, changes in (configs or {}).items():
        config = json.loads(metadata[CONFIG_KEY_PREFIX + component])
        metadata[CONFIG_KEY_PREFIX + component] = json.dumps({**config, **changes})
    save_file(all_tensors, str(target), metadata=metadata)
    return target


def assert_refused_and_untouched(pipe, path, message, **kwargs):
    before = generate(pipe)
    with pytest.raises(ValueError, match=message):
        load_lily_weights(pipe, path, **kwargs)
    for component in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        assert not hasattr(component, "lily_adapters")
    assert torch.equal(generate(pipe), before)


def first_key(path, component, suffix):
    return next(k for k in load_file(str(path)) if k.startswith(f"{component}.") and k.endswith(suffix))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_tensor_is_refused_by_name(saved, fresh, tmp_path, bad):
    key = first_key(saved, "text_encoder_2", "lily_B")
    tensor = load_file(str(saved))[key].clone()
    tensor.view(-1)[3] = bad
    broken = edited_copy(saved, tmp_path / "nan.safetensors", {key: tensor})
    short = key.removeprefix("text_encoder_2.")
    assert_refused_and_untouched(
        fresh, broken, rf"Tensor '{re.escape(short)}' of the text_encoder_2 adapter holds non-finite"
    )


def test_a_float64_value_beyond_fp32_range_counts_as_infinite(saved, fresh, tmp_path):
    key = first_key(saved, "unet", "lily_router.weight")
    tensor = load_file(str(saved))[key].double()
    tensor[0, 0] = 1e300
    broken = edited_copy(saved, tmp_path / "f64.safetensors", {key: tensor})
    assert_refused_and_untouched(fresh, broken, "holds non-finite values")


def test_an_integer_tensor_is_refused(saved, fresh, tmp_path):
    key = first_key(saved, "unet", "lily_router.weight")
    tensor = torch.ones_like(load_file(str(saved))[key], dtype=torch.int64)
    broken = edited_copy(saved, tmp_path / "int.safetensors", {key: tensor})
    assert_refused_and_untouched(fresh, broken, "has dtype torch.int64; Lily weights are floating point")


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        (1e30, "LilyConfig.scaling must be between -1000 and 1000, got 1e"),
        (math.nan, "LilyConfig.scaling must be a finite number, got nan"),
    ],
)
def test_an_absurd_config_scaling_in_the_file_is_refused(saved, fresh, tmp_path, scaling, message):
    broken = edited_copy(saved, tmp_path / "scaling.safetensors", configs={"unet": {"scaling": scaling}})
    assert_refused_and_untouched(fresh, broken, rf"invalid Lily config for unet: {message}")


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (math.nan, "scale must be a finite number, got nan"),
        ("abc", "scale must be a finite number, got 'abc'"),
        (True, "scale must be a finite number, got True"),
        (1e30, "scale must be between -1000 and 1000, got 1e"),
    ],
)
def test_a_bad_scale_is_refused_before_anything_is_installed(saved, fresh, scale, message):
    assert_refused_and_untouched(fresh, saved, message, scale=scale)


def test_a_bad_scale_keeps_the_adapter_already_loaded(saved, fresh):
    load_lily_weights(fresh, saved, scale=0.5)
    before = generate(fresh)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        load_lily_weights(fresh, saved, scale="abc")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        set_lily_scale(fresh, math.inf)
    assert fresh.unet.lily_adapters["default"].scale == 0.5
    assert torch.equal(generate(fresh), before)
    set_lily_scale(fresh, -1000)  # the bound itself is allowed
    assert fresh.unet.lily_adapters["default"].scale == -1000.0


def test_config_scaling_bounds():
    assert LilyConfig(scaling=1000).scaling == 1000.0 and LilyConfig(scaling=-2.5).scaling == -2.5
    with pytest.raises(ValueError, match=r"between -1000 and 1000, got 1000\.5\.$"):
        LilyConfig(scaling=1000.5)
    with pytest.raises(ValueError, match=r"scaling must be a finite number, got 1000000000000000000\d{178}\.\.\.\.$"):
        LilyConfig(scaling=10**400)  # a JSON integer beyond float range: refused, message cut short


def test_resume_copy_refuses_non_finite_tensors(unet):
    """`check_fits` is also what training's resume runs before `copy_into_adapter`."""
    config = LilyConfig(r=2, num_B=2, target_modules=["to_q"])
    layout = build_layout(unet, config)
    adapter = add_lily(unet, config)
    tensors = {key: torch.zeros(shape) for key, shape in expected_shapes(layout, config).items()}
    key = next(k for k in tensors if k.endswith("lily_A.weight"))
    tensors[key][0, 0] = math.nan
    with pytest.raises(LilyFileError, match=rf"Tensor '{re.escape(key)}' of the unet adapter holds non-finite"):
        check_fits(unet, LilyComponentWeights(config, tensors), "unet")
    assert torch.isfinite(adapter.lily_A[0]).all()


def test_peft_import_refuses_non_finite_tensors(tiny_sdxl_dir, unet, tmp_path):
    peft_model = get_peft_model(unet, PeftLilyConfig(r=2, num_B=2, target_modules=["to_q"], init_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = math.inf
    save_file(tensors, str(weights))
    target = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    inputs = unet_inputs(1)
    before = run_unet(target, inputs)
    with pytest.raises(
        LilyFileError, match=rf"Tensor '{re.escape(key)}' of .*adapter_model.safetensors holds non-finite"
    ):
        import_peft_lily(target, tmp_path / "peft")
    assert not hasattr(target, "lily_adapters")
    assert torch.equal(run_unet(target, inputs), before)


def test_peft_import_refuses_an_unreadable_config(unet, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LILY", "r": ')
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(LilyFileError, match=r"adapter_config.json is not valid JSON: Expecting value"):
        import_peft_lily(unet, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LILY", "r": 4, "scaling": 1e30}')
    with pytest.raises(LilyFileError, match=r"invalid Lily config: LilyConfig.scaling must be between"):
        import_peft_lily(unet, tmp_path)
    assert not hasattr(unet, "lily_adapters")
