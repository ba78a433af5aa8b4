"""Smoke test of benchmarks.speed's building blocks on the tiny UNet (no timings are asserted)."""

import pytest
import torch

from benchmarks import contenders, profile_speed, report, speed
from lily_diffusion import count_lily_parameters, count_lora_parameters
from toyworld.tiny_sdxl import build_unet

SPEC = contenders.AdapterSpec(r=4, stride_A=2, num_B=3, small_lora_rank=8)
SETTINGS = speed.Settings(latent=8, train_batch=2, spec=SPEC)


@pytest.fixture(scope="module")
def base():
    unet = build_unet(seed=0)
    unet.requires_grad_(False)
    return unet


@pytest.fixture(scope="module")
def registry(base):
    return contenders.registry(base, SPEC)


def test_registry_has_every_contender_and_a_matched_lora_rank(base, registry):
    assert list(registry) == ["base", "lora-r8", "lora-matched", "peft-lily", "ours-sample", "ours-batch"]
    rank = contenders.matched_lora_rank(base, SPEC)
    lily = count_lily_parameters(base, SPEC.lily_config())
    per_rank = count_lora_parameters(base, 1, SPEC.lily_config())
    assert abs(rank * per_rank - lily) <= per_rank / 2


def test_copies_share_the_base_weights(base):
    copy = contenders.weight_sharing_copy(base)
    assert copy is not base
    assert all(a is b for a, b in zip(copy.parameters(), base.parameters(), strict=True))


@pytest.mark.parametrize("key", ["base", "lora-matched", "peft-lily", "ours-sample", "ours-batch"])
def test_training_step_reaches_every_adapted_layer(base, registry, key):
    prepared = contenders.prepare(base, SPEC, key, registry[key], torch.float32)
    step = speed.TrainingStep(prepared, speed.unet_inputs(prepared.model, 2, SETTINGS, seed=0), SETTINGS)
    step()
    step()  # B starts at zero: the second step also reaches A and the routers
    assert step.layers_without_gradient() == []
    assert len(prepared.per_layer) == (0 if key == "base" else 4 * 2 * 8)  # 8 transformer blocks
    assert not any(p.requires_grad for p in base.parameters())
    speed.inference_forward(prepared, speed.unet_inputs(prepared.model, 2, SETTINGS, seed=1), SETTINGS)()


def test_file_bytes_accounting(base, registry):
    ours = contenders.prepare(base, SPEC, "ours-sample", registry["ours-sample"], torch.float32)
    peft_lily = contenders.prepare(base, SPEC, "peft-lily", registry["peft-lily"], torch.float32)
    lora = contenders.prepare(base, SPEC, "lora-matched", registry["lora-matched"], torch.float32)
    assert ours.num_trainable == peft_lily.num_trainable == count_lily_parameters(base, SPEC.lily_config())
    assert ours.unique_parameter_bytes == 4 * ours.num_trainable
    ours_bytes, peft_bytes, lora_bytes = (speed.file_bytes(p) for p in (ours, peft_lily, lora))
    assert ours.unique_parameter_bytes < ours_bytes < ours.unique_parameter_bytes + 64 * 1024  # header only
    assert peft_bytes > 1.5 * peft_lily.unique_parameter_bytes  # one copy per layer
    assert lora.unique_parameter_bytes < lora_bytes < lora.unique_parameter_bytes + 64 * 1024
    assert speed.file_bytes(contenders.prepare(base, SPEC, "base", registry["base"], torch.float32)) is None


def test_tables_and_targets_from_figures():
    results = {
        "base": {"label": "base", "trainable": 0, "train_s": 1.0, "inference_s": 1.0, "peak_bytes": 100},
        "lora-matched": {"label": "lora", "trainable": 10, "train_s": 1.2, "inference_s": 1.1, "peak_bytes": 120},
        "peft-lily": {"label": "peft", "trainable": 9, "train_s": 1.5, "file_bytes": 80, "unique_bytes": 10},
        "ours-sample": {
            "label": "ours",
            "trainable": 9,
            "train_s": 1.1,
            "inference_s": 1.02,
            "peak_bytes": 110,
            "file_bytes": 10.05,
            "unique_bytes": 10,
        },
    }
    rows = {row[0]: row for row in report.target_rows(results, full_sdxl=True)}
    assert rows["training step: ours-sample / peft LoRA (matched)"][1:] == ["0.917", "–", "≤ 1.00", "yes"]
    assert rows["training step: ours-sample / peft Lily"][-1] == "yes"
    assert rows["file bytes / unique parameter bytes (peft Lily)"][1] == "8.000"
    assert report.target_rows(results)[2][-1].startswith("n/a")  # inference is judged at SDXL widths
    tables = dict(report.iter_tables(results))
    assert len(tables) == 3 and all(table.startswith("| ") for table in tables.values())


def test_peak_rss_can_be_reset_and_read():
    speed.reset_peak_rss()
    assert speed.peak_rss_bytes() >= speed.current_rss_bytes() * 0.9 > 0


@pytest.mark.parametrize("key", ["lora-matched", "peft-lily", "ours-sample"])
def test_profile_clock_times_only_the_adapters(base, registry, key):

    prepared = contenders.prepare(base, SPEC, key, registry[key], torch.float32)
    forward = speed.inference_forward(prepared, speed.unet_inputs(prepared.model, 2, SETTINGS, seed=1), SETTINGS)
    seconds, share = profile_speed.adapter_share(prepared, forward, calls=2)
    assert seconds > 0 and 0 < share < 1  # some of the forward, never all of it


def test_profile_layer_tables_name_every_piece():

    rows = profile_speed.training_layer_costs(tokens=8, width=16, r=4, num_B=3, lora_rank=2)
    assert [row[0] for row in rows] == [
        "base Linear (frozen)",
        "+ LoRA r2 (peft's formula)",
        "+ down-projection only, r=4 (h = x A^T)",
        "+ Lily r=4, num_B=3 (ours, sample routing)",
    ]
    assert rows[0][2] == "–" and all(float(row[1]) > 0 for row in rows)
