import json
import os
import struct

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from lily_diffusion import (
    WEIGHTS_NAME,
    LilyConfig,
    LilyFileError,
    add_lily,
    lily_state_dict,
    load_lily_weights,
    save_lily_weights,
)
from tests.helpers import run_unet, unet_inputs
from toyworld.tiny_sdxl import build_unet

CONFIG = LilyConfig(r=4, stride_A=3, num_B=3, init_weights=False)


@pytest.fixture
def saved(unet, tmp_path):
    adapter = add_lily(unet, CONFIG)
    return unet, adapter, save_lily_weights(tmp_path, unet=unet)


def test_each_tensor_is_stored_once_under_readable_keys(saved):
    _unet, adapter, path = saved
    assert path.name == WEIGHTS_NAME
    unique_bytes = sum(p.numel() * p.element_size() for p in adapter.parameters())
    size = path.stat().st_size
    assert unique_bytes <= size <= unique_bytes * 1.01 + 64 * 1024
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert len(keys) == len({id(p) for p in adapter.parameters()})
    group = adapter.layout.groups[0]
    assert f"unet.{group.paths[0]}.lily_A.weight" in keys
    assert f"unet.{group.paths[3]}.lily_A.weight" in keys and f"unet.{group.paths[1]}.lily_A.weight" not in keys
    assert "unet.to_q@64x64.lily_B" in keys
    assert all(f"unet.{p}.lily_router.weight" in keys for p in adapter.layout.slots)
    assert metadata["format"] == "lily_diffusion" and metadata["format_version"] == "1"
    assert LilyConfig.from_json(metadata["lily_config.unet"]) == CONFIG


def test_state_dict_keys_do_not_depend_on_module_order(unet):
    adapter = add_lily(unet, CONFIG)
    state = lily_state_dict(unet)
    assert len(state) == len(list(adapter.parameters()))
    assert sorted(state) == sorted(state, key=str)  # plain strings
    assert {tuple(t.shape) for k, t in state.items() if k.endswith("lily_B")} == {(3, 4, 64)}


def test_round_trip_into_a_fresh_model_gives_identical_outputs(saved, tiny_sdxl_dir):
    unet, _, path = saved
    inputs = unet_inputs(2)
    expected = run_unet(unet, inputs)
    fresh = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    load_lily_weights(fresh, path.parent)
    assert torch.equal(run_unet(fresh, inputs), expected)
    assert fresh.lily_adapters["default"].config == CONFIG


def test_a_failed_save_keeps_the_previous_file(saved, monkeypatch):
    unet, adapter, path = saved
    before = path.read_bytes()
    with torch.no_grad():
        adapter.lily_B[0].add_(1.0)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lily_diffusion.serialization.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lily_weights(path.parent, unet=unet)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [WEIGHTS_NAME]


def assert_rejected(model, path, message):
    inputs = unet_inputs(1)
    before = run_unet(model, inputs)
    with pytest.raises((LilyFileError, FileNotFoundError), match=message):
        load_lily_weights(model, path)
    assert not hasattr(model, "lily_adapters")
    assert torch.equal(run_unet(model, inputs), before)


def test_truncated_file(saved, tmp_path):
    _, _, path = saved
    broken = tmp_path / "truncated.safetensors"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fresh = build_unet()
    assert_rejected(fresh, broken, "not a readable safetensors file")


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    assert_rejected(build_unet(), junk, "not a readable safetensors file")


def test_header_claims_more_than_the_file_has(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    bad = tmp_path / "short.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert_rejected(build_unet(), bad, "not a readable safetensors file")


def test_lora_file_is_named_as_such(tmp_path):
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down_blocks.1.attn1.to_q.lora_A.weight": torch.zeros(4, 64)}, str(lora))
    assert_rejected(build_unet(), lora, "looks like a LoRA file: load it with pipe.load_lora_weights")


def test_unknown_format_version(tmp_path):
    other = tmp_path / "future.safetensors"
    save_file({"unet.x": torch.zeros(1)}, str(other), metadata={"format": "lily_diffusion", "format_version": "9"})
    assert_rejected(build_unet(), other, "format_version '9'")


def test_file_for_a_different_model_width(tmp_path):
    wide = UNet2DConditionModel(
        **{**dict(build_unet().config), "block_out_channels": (32, 96), "attention_head_dim": (2, 6)}
    )
    add_lily(wide, CONFIG)
    path = save_lily_weights(tmp_path, unet=wide)
    assert_rejected(
        build_unet(), path, r"other widths; shape mismatches \(\d+\): .*lily_A.weight: file \(4, 96\), model \(4, 64\)"
    )


def test_config_whose_targets_match_nothing(tmp_path, pipe):
    add_lily(pipe.text_encoder, LilyConfig(r=2, target_modules=["q_proj"]))
    path = save_lily_weights(tmp_path, unet=pipe.text_encoder)  # a text-encoder adapter filed as unet
    assert_rejected(build_unet(), path, r"does not fit UNet2DConditionModel.*\['q_proj'\] matches no module")


def test_missing_and_unexpected_keys_are_named(saved, tmp_path):
    _, _, path = saved
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in list(handle.keys())}
        metadata = handle.metadata()
    dropped = sorted(k for k in tensors if k.endswith("lily_router.weight"))[0]
    del tensors[dropped]
    tensors["unet.extra.lily_router.weight"] = torch.zeros(3, 4)
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    assert_rejected(
        build_unet(), edited, rf"missing keys \(1\): {dropped[5:]}; unexpected keys \(1\): extra.lily_router"
    )


def test_missing_file(tmp_path):
    assert_rejected(build_unet(), tmp_path, "No Lily weights file pytorch_lily_weights.safetensors in ")
