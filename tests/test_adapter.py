import pytest
import torch
from torch import nn

from lily_diffusion import (
    LilyConfig,
    LilyMergeError,
    add_lily,
    disable_lily,
    enable_lily,
    fuse_lily,
    remove_lily,
    set_lily_adapter,
    set_lily_scale,
)
from tests.helpers import run_unet, take, unet_inputs


def nonzero(config: LilyConfig) -> LilyConfig:
    config.init_weights = False  # B Kaiming too, so the adapter changes outputs
    return config


def test_add_then_remove_restores_the_original_linears_bit_identically(unet):
    inputs = unet_inputs(2)
    before = run_unet(unet, inputs)
    originals = {name: m for name, m in unet.named_modules() if isinstance(m, nn.Linear)}
    keys_before = list(unet.state_dict())
    add_lily(unet, nonzero(LilyConfig(r=4, stride_A=2, num_B=3)))
    assert (run_unet(unet, inputs) - before).abs().max() > 1e-3
    assert [k for k in unet.state_dict() if not k.startswith("lily_adapters.")] == keys_before
    remove_lily(unet)
    assert torch.equal(run_unet(unet, inputs), before)
    assert all(unet.get_submodule(name) is module for name, module in originals.items())
    assert not hasattr(unet, "lily_adapters") and list(unet.state_dict()) == keys_before


def test_zero_init_adapter_is_a_no_op_and_only_the_adapter_trains(unet):
    inputs = unet_inputs(2)
    before = run_unet(unet, inputs)
    adapter = add_lily(unet, LilyConfig(r=4, stride_A=2, num_B=3))
    assert torch.equal(run_unet(unet, inputs), before)
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}


def test_sample_routing_makes_each_sample_independent_of_the_batch(unet):
    add_lily(unet, nonzero(LilyConfig(r=4, stride_A=2, num_B=3)))
    inputs = unet_inputs(4, seed=3)
    together = run_unet(unet, inputs)
    for index in range(4):
        alone = run_unet(unet, take(inputs, index))
        assert (alone[0] - together[index]).abs().max() <= 1e-5


def test_batch_routing_depends_on_the_batch_like_peft(unet):
    add_lily(unet, nonzero(LilyConfig(r=4, stride_A=2, num_B=3, routing="batch")))
    inputs = unet_inputs(4, seed=3)
    together = run_unet(unet, inputs)
    alone = run_unet(unet, take(inputs, 0))
    assert (alone[0] - together[0]).abs().max() > 1e-4


def test_scale_disable_enable_and_switching_adapters(unet):
    inputs = unet_inputs(2)
    base = run_unet(unet, inputs)
    add_lily(unet, nonzero(LilyConfig(r=4, stride_A=2, num_B=3)), "one")
    one = run_unet(unet, inputs)
    add_lily(unet, nonzero(LilyConfig(r=2, stride_A=1, num_B=2)), "two")
    two = run_unet(unet, inputs)
    assert (one - two).abs().max() > 1e-3
    set_lily_adapter(unet, "one")
    assert torch.equal(run_unet(unet, inputs), one)
    disable_lily(unet)
    assert torch.equal(run_unet(unet, inputs), base)
    enable_lily(unet)
    assert torch.equal(run_unet(unet, inputs), one)
    set_lily_scale(unet, 0.0, "one")
    assert torch.equal(run_unet(unet, inputs), base)
    set_lily_scale(unet, 0.5, "one")
    half = run_unet(unet, inputs)
    assert (half - base).abs().max() > 1e-4 and (half - one).abs().max() > 1e-4
    set_lily_adapter(unet, None)
    assert torch.equal(run_unet(unet, inputs), base)
    remove_lily(unet, "one")
    set_lily_adapter(unet, "two")
    assert torch.equal(run_unet(unet, inputs), two)
    with pytest.raises(KeyError, match="no Lily adapter named 'one'"):
        remove_lily(unet, "one")


def test_adding_an_existing_name_or_a_bad_name_is_an_error(unet):
    add_lily(unet, LilyConfig(r=2))
    with pytest.raises(ValueError, match="already has a Lily adapter named 'default'"):
        add_lily(unet, LilyConfig(r=2))
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        add_lily(unet, LilyConfig(r=2), "a.b")


def test_merge_and_fuse_explain_why_lily_cannot_be_merged(unet, pipe):
    adapter = add_lily(unet, LilyConfig(r=2))
    layer = next(iter(adapter.layers.values()))
    for attempt in (layer.merge, layer.get_delta_weight, adapter.merge, lambda: fuse_lily(pipe)):
        with pytest.raises(LilyMergeError, match=r"cannot be merged.*depends|router applied to each input.*LoRA"):
            attempt()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_models_train_in_fp32(unet, dtype):
    unet.to(dtype)
    adapter = add_lily(unet, nonzero(LilyConfig(r=4, stride_A=2, num_B=3)))
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    inputs = unet_inputs(2)
    inputs = {
        **inputs,
        "sample": inputs["sample"].to(dtype),
        "encoder_hidden_states": inputs["encoder_hidden_states"].to(dtype),
    }
    inputs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in inputs["added_cond_kwargs"].items()}
    out = unet(**inputs).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_adapter_moves_with_the_model_and_survives_deepcopy(unet):
    import copy

    adapter = add_lily(unet, nonzero(LilyConfig(r=2, stride_A=2, num_B=2)))
    inputs = unet_inputs(1)
    out = run_unet(unet, inputs)
    clone = copy.deepcopy(unet)
    assert torch.equal(run_unet(clone, inputs), out)
    clone_adapter = clone.lily_adapters["default"]
    assert clone_adapter is not adapter
    assert all(layer.adapters["default"] is clone_adapter for layer in clone_adapter.layers.values())
