import math

import pytest

from lily_diffusion import LilyConfig


def test_defaults_are_the_sdxl_budget_config():
    config = LilyConfig()
    assert (config.r, config.stride_A, config.num_B, config.scaling) == (32, 10, 8, 1.0)
    assert config.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config.routing == "sample" and config.init_weights is True


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"stride_A": 0}, "stride_A must be an integer >= 1"),
        ({"num_B": 1}, "num_B must be an integer >= 2"),
        ({"scaling": math.inf}, "scaling must be a finite number"),
        ({"scaling": math.nan}, "scaling must be a finite number"),
        ({"routing": "token"}, "routing must be one of"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"target_modules": ""}, "target_modules must not be an empty string"),
        ({"target_modules": ["to_q", ""]}, "target_modules must be a non-empty list"),
    ],
)
def test_invalid_values_raise_a_clear_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        LilyConfig(**changes)


def test_json_round_trip_and_sets_become_sorted_lists():
    config = LilyConfig(r=8, stride_A=3, num_B=4, scaling=0.5, target_modules={"to_v", "to_q"}, routing="batch")
    assert config.target_modules == ["to_q", "to_v"]
    again = LilyConfig.from_json(config.to_json())
    assert again == config


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"Unknown LilyConfig field\(s\) \['alpha'\]"):
        LilyConfig.from_dict({"r": 4, "alpha": 8})


def test_from_json_rejects_non_objects():
    with pytest.raises(ValueError, match="must be an object"):
        LilyConfig.from_json("[1, 2]")


def test_from_peft_keeps_shared_fields_and_uses_batch_routing():
    peft = {
        "peft_type": "LILY",
        "r": 6,
        "stride_A": 2,
        "num_B": 3,
        "scaling": 2.0,
        "target_modules": ["to_v", "to_q"],
        "exclude_modules": None,
        "init_weights": True,
        "modules_to_save": None,
    }
    config = LilyConfig.from_peft(peft)
    assert (config.r, config.stride_A, config.num_B, config.scaling) == (6, 2, 3, 2.0)
    assert config.target_modules == ["to_v", "to_q"] and config.routing == "batch"
