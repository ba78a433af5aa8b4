import math

import pytest
import torch
from torch import nn

from lily_diffusion import LilyConfig, add_lily
from lily_diffusion.layer import LilyLinear
from lily_diffusion.sharing import build_layout, target_name
from toyworld.sdxl_config import build_sdxl_unet_on_meta


def distinct(parameters) -> int:
    return len({id(p) for p in parameters})


def shared_objects(adapter, group_index):
    """The A and B objects the group's layers really use (looked up through the wrapped layers)."""
    group = adapter.layout.groups[group_index]
    a_objects, b_objects = [], []
    for path in group.paths:
        slot = adapter.layers[path].slots["default"]
        a_objects.append(adapter.lily_A[slot.a_index])
        b_objects.append(adapter.lily_B[slot.group])
    return group, a_objects, b_objects


@pytest.mark.parametrize("stride_A", [1, 2, 3, 1000])
def test_number_of_distinct_A_and_B_follows_the_rule(unet, stride_A):
    adapter = add_lily(unet, LilyConfig(r=4, stride_A=stride_A, num_B=3))
    assert len(adapter.layout.groups) == 4  # to_q, to_k, to_v, to_out.0 (all 64x64 in the tiny UNet)
    for index in range(len(adapter.layout.groups)):
        group, a_objects, b_objects = shared_objects(adapter, index)
        assert len(group.paths) in (16, 16, 16, 16)
        assert distinct(a_objects) == math.ceil(len(group.paths) / stride_A)
        assert distinct(b_objects) == 1
        # consecutive layers in registration order share: layer i uses A #(i // stride_A)
        firsts = [a_objects[i] for i in range(0, len(a_objects), stride_A)]
        for i, a in enumerate(a_objects):
            assert a is firsts[i // stride_A]
    assert adapter.num_parameters == sum(p.numel() for p in adapter.parameters())
    assert distinct(adapter.parameters()) == adapter.layout.num_A + 4 + 64


def test_q_and_v_never_share_also_with_a_regex(unet):
    for targets in (["to_q", "to_v"], r".*attn[12]\.to_[qv]"):
        model = type(unet).from_config(unet.config)
        adapter = add_lily(model, LilyConfig(r=4, stride_A=1000, num_B=2, target_modules=targets))
        keys = [group.key for group in adapter.layout.groups]
        assert keys == ["to_q@64x64", "to_v@64x64"], targets
        _, q_a, q_b = shared_objects(adapter, 0)
        _, v_a, v_b = shared_objects(adapter, 1)
        assert {id(a) for a in q_a}.isdisjoint(id(a) for a in v_a)
        assert q_b[0] is not v_b[0]


def test_shared_parameters_stay_tied_after_optimizer_steps(unet):
    from tests.helpers import unet_inputs

    adapter = add_lily(unet, LilyConfig(r=4, stride_A=3, num_B=3))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    for step in range(3):
        loss = unet(**unet_inputs(2, seed=step)).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for index in range(len(adapter.layout.groups)):
        _group, a_objects, b_objects = shared_objects(adapter, index)
        for i, a in enumerate(a_objects):
            leader = a_objects[(i // 3) * 3]
            assert a is leader and torch.equal(a, leader)
        assert all(b is b_objects[0] for b in b_objects)
    assert any(pool.abs().sum() > 0 for pool in adapter.lily_B)  # B really trained away from zero


def test_target_name_uses_the_longest_suffix_not_set_order():
    targets = ["out.0", "to_out.0", "to_q"]
    assert target_name("a.attn1.to_out.0", targets) == "to_out.0"
    assert target_name("a.attn1.to_q", targets) == "to_q"
    assert target_name("a.attn1.my_to_q", targets) is None
    assert target_name("down.attn1.to_out.0", r".*to_out\.0") == "to_out.0"
    assert target_name("down.attn1.to_k", r".*to_(k|v)") == "to_k"


def test_exclude_modules_and_errors_for_bad_targets(unet):
    layout = build_layout(unet, LilyConfig(target_modules=["to_q"], exclude_modules=["attn2.to_q"]))
    assert all(".attn1." in path for path in layout.slots)
    with pytest.raises(ValueError, match=r"matches no module of UNet2DConditionModel.*Some of its Linear layers"):
        build_layout(unet, LilyConfig(target_modules=["not_a_layer"]))
    with pytest.raises(TypeError, match=r"only adapt nn.Linear.*conv_in.*Conv2d"):
        build_layout(unet, LilyConfig(target_modules=["conv_in"]))


def test_sdxl_unet_layout_matches_the_design():
    unet = build_sdxl_unet_on_meta()
    layout = build_layout(unet, LilyConfig())
    sizes = {group.key: len(group.paths) for group in layout.groups}
    assert layout.num_layers == 560
    assert sizes == {
        "to_q@640x640": 20,
        "to_out.0@640x640": 20,
        "to_q@1280x1280": 120,
        "to_out.0@1280x1280": 120,
        "to_k@640x640": 10,
        "to_v@640x640": 10,
        "to_k@640x2048": 10,
        "to_v@640x2048": 10,
        "to_k@1280x1280": 60,
        "to_v@1280x1280": 60,
        "to_k@1280x2048": 60,
        "to_v@1280x2048": 60,
    }
    assert all(".attn2." in p for g in layout.groups if g.in_features == 2048 for p in g.paths)


def test_second_adapter_gets_its_own_sharing(unet):
    first = add_lily(unet, LilyConfig(r=4, stride_A=2, num_B=2), "first")
    second = add_lily(unet, LilyConfig(r=3, stride_A=4, num_B=3), "second")
    assert first.layout.num_A == 4 * 8 and second.layout.num_A == 4 * 4
    path = first.layout.groups[0].paths[0]
    layer = unet.get_submodule(path)
    assert set(layer.adapters) == {"first", "second"}
    assert layer.adapters["second"] is second and layer.active_adapters == {"second": 1.0}
    assert distinct(second.parameters()) == 16 + 4 + 64


def test_text_encoders_are_adapted(pipe):
    from lily_diffusion.config import TEXT_ENCODER_TARGET_MODULES

    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        adapter = add_lily(
            encoder, LilyConfig(r=4, stride_A=2, num_B=2, target_modules=list(TEXT_ENCODER_TARGET_MODULES))
        )
        assert adapter.layout.num_layers == 8  # 2 layers x 4 projections
        q_proj = next(m for name, m in encoder.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
        assert isinstance(q_proj, LilyLinear) and q_proj.adapters["default"] is adapter


def test_linear_subclasses_with_their_own_forward_are_refused():
    class QuantizedLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x.round())

    model = nn.Sequential()
    model.add_module("to_q", QuantizedLinear(4, 4))
    with pytest.raises(TypeError, match=r"matched 'to_q' of type QuantizedLinear"):
        build_layout(model, LilyConfig(target_modules=["to_q"]))


def test_the_layout_module_imports_no_module_that_builds_on_it():
    import ast
    from pathlib import Path

    import lily_diffusion.sharing as sharing

    tree = ast.parse(Path(sharing.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"layer", "adapter", "serialization", "pipeline"}
