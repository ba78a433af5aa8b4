"""export_peft_lily writes a folder peft's PeftModel.from_pretrained loads, computing what ours computes."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import PeftModel

from lily_diffusion import LilyConfig, add_lily, export_peft_lily, import_peft_lily, lily_state_dict
from tests.helpers import run_unet, take, unet_inputs


@pytest.fixture
def fresh_unet(tiny_sdxl_dir):
    return lambda: UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


def config(routing: str, **changes) -> LilyConfig:
    values = {"r": 4, "stride_A": 2, "num_B": 3, "scaling": 0.8, "init_weights": False, "routing": routing}
    return LilyConfig(**{**values, **changes})


def test_peft_loads_the_export_and_computes_our_outputs(fresh_unet, tmp_path):
    ours = fresh_unet()
    add_lily(ours, config("batch", exclude_modules=["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]))
    folder = export_peft_lily(ours, tmp_path / "peft")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LILY" and (saved["r"], saved["stride_A"], saved["num_B"]) == (4, 2, 3)
    peft_model = PeftModel.from_pretrained(fresh_unet(), folder)
    inputs = unet_inputs(4, seed=3)
    expected = run_unet(ours, inputs)
    assert (run_unet(peft_model.base_model.model, inputs) - expected).abs().max() <= 1e-5
    assert (run_unet(fresh_unet(), inputs) - expected).abs().max() > 1e-3  # not two no-ops

    back = fresh_unet()  # round trip through the peft import: the same weights, each once
    import_peft_lily(back, folder)
    mine, theirs = lily_state_dict(back), lily_state_dict(ours)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    got, want = back.lily_adapters["default"].config.to_dict(), ours.lily_adapters["default"].config.to_dict()
    assert sorted(got.pop("target_modules")) == sorted(want.pop("target_modules")) and got == want  # peft: a set


def test_sample_routing_matches_peft_one_sample_at_a_time(fresh_unet, tmp_path):
    ours = fresh_unet()
    add_lily(ours, config("sample"))
    peft_model = PeftModel.from_pretrained(fresh_unet(), export_peft_lily(ours, tmp_path / "peft"))
    single = take(unet_inputs(2, seed=4), 1)
    assert (run_unet(peft_model.base_model.model, single) - run_unet(ours, single)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (r".*attn1\.to_[qv]", r"^export_peft_lily needs target_modules as a list of suffixes: peft groups"),
        (
            ["attn1.to_q", "to_q"],
            r"^export_peft_lily cannot express target_modules \['attn1.to_q'\] that end with another",
        ),
    ],
)
def test_layouts_peft_would_group_differently_are_refused(fresh_unet, tmp_path, targets, message):
    ours = fresh_unet()
    add_lily(ours, config("batch", target_modules=targets))
    with pytest.raises(ValueError, match=message):
        export_peft_lily(ours, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
