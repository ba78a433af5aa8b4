"""Parity with peft's LilyModel (routing="batch") and import of peft-saved adapter folders."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LilyConfig as PeftLilyConfig
from peft import get_peft_model, inject_adapter_in_model

from lily_diffusion import LilyConfig, LilyFileError, add_lily, import_peft_lily, load_lily_weights, save_lily_weights
from tests.helpers import run_unet, take, unet_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def peft_config(target_modules=TARGETS) -> PeftLilyConfig:
    return PeftLilyConfig(r=4, stride_A=2, num_B=3, scaling=0.8, target_modules=target_modules, init_weights=False)


@pytest.fixture
def fresh_unet(tiny_sdxl_dir):
    return lambda: UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


def test_same_weights_give_the_same_outputs_as_peft(fresh_unet):
    ours = fresh_unet()
    adapter = add_lily(ours, LilyConfig(r=4, stride_A=2, num_B=3, scaling=0.8, init_weights=False, routing="batch"))
    theirs = inject_adapter_in_model(peft_config(), fresh_unet())
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for path, slot in adapter.layout.slots.items():
            layer = modules[path]
            layer.lily_A["default"].weight.copy_(adapter.lily_A[slot.a_index])
            layer.lily_B["default"].weight.copy_(adapter.lily_B[slot.group].reshape(-1, layer.out_features))
            layer.lily_router["default"].weight.copy_(adapter.lily_router[slot.router_index])
    inputs = unet_inputs(4, seed=5)
    difference = (run_unet(ours, inputs) - run_unet(theirs, inputs)).abs().max()
    assert difference <= 1e-5
    base = run_unet(fresh_unet(), inputs)
    assert (run_unet(ours, inputs) - base).abs().max() > 1e-3  # the comparison is not between two no-ops


def test_import_of_a_peft_saved_folder_matches_peft(fresh_unet, tmp_path):
    peft_model = get_peft_model(fresh_unet(), peft_config())
    peft_model.save_pretrained(tmp_path / "peft")
    inputs = unet_inputs(4, seed=6)
    expected = run_unet(peft_model.base_model.model, inputs)

    ours = fresh_unet()
    adapter = import_peft_lily(ours, tmp_path / "peft")
    assert adapter.config.routing == "batch" and adapter.config.scaling == 0.8
    assert (run_unet(ours, inputs) - expected).abs().max() <= 1e-5

    # Converted to our format: one copy of each tensor, same outputs after loading.
    path = save_lily_weights(tmp_path / "ours", unet=ours)
    peft_bytes = (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size
    assert path.stat().st_size * 2 < peft_bytes
    again = fresh_unet()
    load_lily_weights(again, path)
    assert torch.equal(run_unet(again, inputs), run_unet(ours, inputs))


def test_import_with_sample_routing_matches_peft_for_a_single_sample(fresh_unet, tmp_path):
    peft_model = get_peft_model(fresh_unet(), peft_config())
    peft_model.save_pretrained(tmp_path / "peft")
    single = take(unet_inputs(2, seed=7), 1)
    ours = fresh_unet()
    import_peft_lily(ours, tmp_path / "peft", routing="sample")
    assert (run_unet(ours, single) - run_unet(peft_model.base_model.model, single)).abs().max() <= 1e-5


def test_peft_regex_layouts_that_share_q_with_v_are_refused(fresh_unet, tmp_path):
    peft_model = get_peft_model(fresh_unet(), peft_config(target_modules=r".*attn1\.to_[qv]"))
    peft_model.save_pretrained(tmp_path / "peft")
    target = fresh_unet()
    with pytest.raises(LilyFileError, match="does not share A the way lily_diffusion does"):
        import_peft_lily(target, tmp_path / "peft")
    assert not hasattr(target, "lily_adapters")


def test_not_a_peft_lily_folder(fresh_unet, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a peft adapter folder"):
        import_peft_lily(fresh_unet(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(LilyFileError, match="is a peft 'LORA' adapter, not a Lily adapter"):
        import_peft_lily(fresh_unet(), tmp_path)
