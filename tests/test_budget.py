import pytest

from lily_diffusion import (
    LilyConfig,
    add_lily,
    count_lily_parameters,
    count_lora_parameters,
    lily_config_for_lora_budget,
)
from toyworld.sdxl_config import build_sdxl_unet_on_meta


@pytest.fixture(scope="module")
def sdxl_unet():
    return build_sdxl_unet_on_meta()


def closed_form(r, stride_A, num_B):
    """Design §2: Σ ceil(n/stride_A)·r·in + Σ num_B·r·out + 560·r·num_B over SDXL's 12 groups."""
    groups = [  # (layers, in, out)
        (20, 640, 640),
        (120, 1280, 1280),
        (20, 640, 640),
        (120, 1280, 1280),  # to_q, to_out.0
        (10, 640, 640),
        (10, 2048, 640),
        (60, 1280, 1280),
        (60, 2048, 1280),  # to_k
        (10, 640, 640),
        (10, 2048, 640),
        (60, 1280, 1280),
        (60, 2048, 1280),  # to_v
    ]
    a = sum(-(-n // stride_A) * r * fan_in for n, fan_in, _ in groups)
    b = sum(num_B * r * fan_out for _, _, fan_out in groups)
    return a + b + 560 * r * num_B


@pytest.mark.parametrize(("r", "stride_A", "num_B"), [(32, 10, 8), (16, 2, 4), (4, 1, 2), (7, 1000, 3)])
def test_counts_match_the_closed_form_and_the_real_adapter(sdxl_unet, r, stride_A, num_B):
    config = LilyConfig(r=r, stride_A=stride_A, num_B=num_B)
    counted = count_lily_parameters(sdxl_unet, config)
    assert counted == closed_form(r, stride_A, num_B)
    model = build_sdxl_unet_on_meta()
    assert add_lily(model, config).num_parameters == counted


def test_default_config_is_within_the_diffusers_lora_default_budget(sdxl_unet):
    assert count_lily_parameters(sdxl_unet, LilyConfig()) == 5_607_424
    assert count_lora_parameters(sdxl_unet, 4) == 5_806_080


def test_config_for_lora_budget_is_the_closest_not_above(sdxl_unet):
    config = lily_config_for_lora_budget(sdxl_unet, 4)
    budget = count_lora_parameters(sdxl_unet, 4)
    count = count_lily_parameters(sdxl_unet, config)
    assert (config.stride_A, config.num_B) == (10, 8)
    assert count <= budget < count_lily_parameters(sdxl_unet, LilyConfig(r=config.r + 1))
    assert config.r == 33
    with pytest.raises(ValueError, match="lora_rank must be a positive integer"):
        lily_config_for_lora_budget(sdxl_unet, 0)


def test_too_small_a_budget_is_a_clear_error(unet):
    with pytest.raises(ValueError, match="No Lily config with stride_A=1, num_B=64 fits LoRA rank 1"):
        lily_config_for_lora_budget(unet, 1, LilyConfig(stride_A=1, num_B=64))
