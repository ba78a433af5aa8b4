"""Weights-only statistics of a saved Lily file, and LoRA files read for comparison."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lily_diffusion import LilyConfig, LilyFileError, add_lily, save_lily_weights
from lily_diffusion.diagnostics.analysis import expert_use
from lily_diffusion.diagnostics.lora import LoraFileError, lora_layer_stats, read_lora_file
from lily_diffusion.diagnostics.stats import effective_rank
from lily_diffusion.diagnostics.weights import lily_weight_stats

CONFIG = LilyConfig(r=2, stride_A=2, num_B=3, init_weights=False)


def test_weights_only_statistics_of_a_saved_file(unet, tmp_path):
    adapter = add_lily(unet, CONFIG)
    with torch.no_grad():
        for pool in adapter.lily_B:
            pool[1].zero_()  # expert 1 of every pool never learned anything
    path = save_lily_weights(tmp_path, unet=unet)
    stats = lily_weight_stats(tmp_path)  # the folder works as well as the file
    assert stats.configs == {"unet": CONFIG.to_dict()}
    assert len(stats.pools) == len(adapter.layout.groups)
    assert len(stats.a_matrices) == adapter.layout.num_A
    assert len(stats.router_norms) == adapter.layout.num_layers
    groups = {group.key: index for index, group in enumerate(adapter.layout.groups)}
    for pool in stats.pools:
        B = adapter.lily_B[groups[pool.group]].detach()
        assert pool.expert_norms == pytest.approx([B[e].norm().item() for e in range(3)], rel=1e-6)
        assert pool.expert_norms[1] == 0.0
        assert pool.pool_effective_rank <= 2 * CONFIG.r + 1e-9  # two non-zero experts of rank r
    uses = expert_use(stats.pools)
    assert all(use.unused == [1] and use.mean_weights is None for use in uses)
    assert all(sum(use.shares) == pytest.approx(1.0) for use in uses)
    assert lily_weight_stats(path).pools == stats.pools


def test_non_finite_weights_are_refused(unet, tmp_path):
    adapter = add_lily(unet, CONFIG)
    with torch.no_grad():
        adapter.lily_B[0][0, 0, 0] = float("nan")
    save_lily_weights(tmp_path, unet=unet)
    with pytest.raises(LilyFileError, match="non-finite"):
        lily_weight_stats(tmp_path)


def test_missing_and_non_lily_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="No Lily weights file"):
        lily_weight_stats(tmp_path / "nothing")
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(2, 4), "unet.a.lora_B.weight": torch.zeros(4, 2)}, str(lora))
    with pytest.raises(LilyFileError, match="looks like a LoRA file"):
        lily_weight_stats(lora)


def test_lora_files_in_both_layouts_with_their_scale(tmp_path):
    torch.manual_seed(0)
    down, up = torch.randn(4, 12), torch.randn(20, 4)
    peft = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    peft.parent.mkdir()
    metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4})}
    save_file({"unet.x.to_q.lora_A.weight": down, "unet.x.to_q.lora_B.weight": up}, str(peft), metadata=metadata)
    layers = read_lora_file(peft.parent)
    assert list(layers) == ["unet.x.to_q"] and layers["unet.x.to_q"].scale == 2.0
    old = tmp_path / "old.safetensors"
    tensors = {
        "unet.x.to_q.lora.down.weight": down,
        "unet.x.to_q.lora.up.weight": up,
        "unet.x.to_q.alpha": torch.tensor(2.0),
    }
    save_file(tensors, str(old))
    assert read_lora_file(old)["unet.x.to_q"].scale == 0.5
    [stats] = lora_layer_stats(read_lora_file(old))
    expected = torch.linalg.svdvals(0.5 * up.double() @ down.double())[:4]
    assert stats.singular_values == pytest.approx(expected.tolist())
    assert stats.effective_rank == pytest.approx(effective_rank(expected)) and stats.effective_rank <= 4
    assert (stats.rank, stats.out_features, stats.in_features) == (4, 20, 12)


def test_unusable_lora_files_are_refused(unet, tmp_path):
    add_lily(unet, CONFIG)
    lily = save_lily_weights(tmp_path / "lily", unet=unet)
    with pytest.raises(LoraFileError, match="is a Lily file"):
        read_lora_file(lily)
    cases = {
        "empty": {"unet.x.weight": torch.zeros(2, 2)},
        "unpaired": {"unet.x.lora_A.weight": torch.zeros(2, 4)},
        "dora": {
            "unet.x.lora_A.weight": torch.zeros(2, 4),
            "unet.x.lora_B.weight": torch.zeros(4, 2),
            "unet.x.lora_magnitude_vector": torch.ones(4),
        },
        "kohya": {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
        "nan": {"unet.x.lora_A.weight": torch.full((2, 4), float("nan")), "unet.x.lora_B.weight": torch.zeros(4, 2)},
    }
    messages = {
        "empty": "no LoRA layers",
        "unpaired": "no matching up",
        "dora": "DoRA",
        "kohya": "Kohya",
        "nan": "non-finite",
    }
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(LoraFileError, match=messages[name]):
            read_lora_file(path)
    with pytest.raises(FileNotFoundError, match="No LoRA weights file"):
        read_lora_file(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoraFileError, match="not a readable safetensors"):
        read_lora_file(tmp_path / "bad.safetensors")
