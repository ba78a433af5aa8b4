"""The method table: each method's training flags per budget, Lily's sharing per budget on the toy base, and which
methods the training script in this checkout can train."""

import dataclasses
import itertools

import pytest
from diffusers import UNet2DConditionModel

from lily_diffusion import LilyConfig, count_lily_parameters, count_lora_parameters, lily_config_for_lora_budget
from lily_diffusion.backends import BACKENDS
from lily_diffusion.training.args import parse_args
from toyworld.methods import (
    LILY_SHAPES,
    METHODS,
    TARGET_MODULES_FLAG,
    budget_label,
    get_method,
    method_name,
)
from toyworld.paths import BASE_MODEL_DIR


def test_each_method_is_one_entry_with_its_flags_per_budget():
    assert list(METHODS) == ["lily", "lora", "dora", "lokr", "loha"]
    assert [method_name(m) for m in METHODS] == ["Lily", "LoRA", "DoRA", "LoKr", "LoHa"]
    assert METHODS["lora"].budgets == (1, 2, 4, 8) and METHODS["lora"].optional_budgets == ()
    assert METHODS["lily"].budgets == (1, 2, 4) and METHODS["lily"].all_budgets == (1, 2, 4, 8)  # 2x if time allows
    assert all(METHODS[m].budgets == (4,) for m in ("dora", "lokr", "loha"))
    assert get_method("lora").flags(2) == ["--adapter=lora", "--rank=2", "--lora_alpha=2"]
    assert get_method("lily").flags(1) == [
        "--adapter=lily",
        "--lily_stride_A=8",
        "--lily_num_B=2",
        "--match_lora_budget=1",
    ]
    assert get_method("lily").flags(4)[1:3] == ["--lily_stride_A=4", "--lily_num_B=4"]
    assert get_method("lokr").flags(4) == ["--adapter=lokr", "--lokr_decompose_factor=4", "--match_lora_budget=4"]
    assert method_name("other") == "other"
    with pytest.raises(ValueError, match="unknown method 'ia3'; known: lily, lora, dora, lokr, loha"):
        get_method("ia3")
    assert [budget_label(b) for b in (1, 2, 4, 8)] == [
        "LoRA r1 (1/4x)",
        "LoRA r2 (1/2x)",
        "LoRA r4 (1x)",
        "LoRA r8 (2x)",
    ]


def test_every_method_is_an_adapter_kind_whose_flags_parse():
    assert set(METHODS) == set(BACKENDS)
    for method in METHODS.values():
        for budget in method.all_budgets:
            flags = method.flags(budget)
            parse_args(["--pretrained_model_name_or_path=x", "--instance_data_dir=y", "--instance_prompt=z", *flags])


def test_lily_keeps_r_large_at_small_budgets_on_the_toy_base():
    unet = UNet2DConditionModel.from_pretrained(BASE_MODEL_DIR, subfolder="unet")
    base = LilyConfig(target_modules=TARGET_MODULES_FLAG.partition("=")[2])  # the layers the workbench adapts

    def fitted(budget, stride_a, num_b):
        return lily_config_for_lora_budget(unet, budget, dataclasses.replace(base, stride_A=stride_a, num_B=num_b))

    got = {budget: fitted(budget, *LILY_SHAPES[budget]) for budget in (1, 2, 4, 8)}
    assert {budget: config.r for budget, config in got.items()} == {1: 3, 2: 6, 4: 7, 8: 14}
    for budget, config in got.items():
        assert count_lily_parameters(unet, config) <= count_lora_parameters(unet, budget, config)
    # below the rank-4 budget no other sharing gives a larger r (the rank-4 shape, stride_A 4 / num_B 4, gives 1, 3)
    assert [fitted(b, 4, 4).r for b in (1, 2)] == [1, 3]
    for budget in (1, 2):
        others = [fitted(budget, s, n).r for s, n in itertools.product((1, 2, 4, 8), (2, 3, 4))]
        assert max(others) == got[budget].r
