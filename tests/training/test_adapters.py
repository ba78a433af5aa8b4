"""Adapter set-up, and the save / in-place load round trip that checkpoints rely on (every adapter kind)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lily_diffusion import LilyConfig, count_lily_parameters, count_lora_parameters, count_peft_parameters
from lily_diffusion.backends import BACKENDS, get_backend
from lily_diffusion.training.adapters import AdaptedModels, TrainableAdapters, add_adapters
from lily_diffusion.training.args import options_from_args, parse_args
from lily_diffusion.training.checkpointing import load_adapter_weights_in_place
from lily_diffusion.training.errors import TrainingError
from toyworld.tiny_sdxl import build_tiny_sdxl_pipeline

REQUIRED = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
SMALL_LILY = ["--lily_r", "4", "--lily_stride_A", "2", "--lily_num_B", "2"]
# Each kind with small settings (LoKr split 2 x 32 on the tiny model's 64-wide layers, so its w2 is low-rank).
KIND_FLAGS = {
    "lily": SMALL_LILY,
    "lora": ["--rank", "2", "--lora_alpha", "4"],
    "dora": ["--rank", "2", "--lora_alpha", "4"],
    "lokr": ["--rank", "3", "--lora_alpha", "6", "--lokr_decompose_factor", "2"],
    "loha": ["--rank", "2", "--lora_alpha", "4"],
}


def _models(train_text_encoder: bool) -> AdaptedModels:
    pipe = build_tiny_sdxl_pipeline(seed=0)
    if not train_text_encoder:
        return AdaptedModels(unet=pipe.unet)
    return AdaptedModels(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)


def _add(args, models: AdaptedModels) -> TrainableAdapters:
    return add_adapters(get_backend(args.adapter), options_from_args(args).adapter, models, mixed_precision=False)


def _randomize(parameters: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize(("adapter", "extra"), KIND_FLAGS.items())
def test_checkpoint_round_trip_is_exact_and_keeps_the_parameters(tmp_path, adapter, extra):
    args = parse_args([*REQUIRED, "--adapter", adapter, "--train_text_encoder", *extra])
    models = _models(train_text_encoder=True)
    trainable = _add(args, models)
    parameters = trainable.unet_parameters + trainable.text_encoder_parameters
    assert trainable.unet_parameters and trainable.text_encoder_parameters
    assert all(p.requires_grad and p.dtype == torch.float32 for p in parameters)
    frozen = [p for m in models.components().values() for p in m.parameters() if not p.requires_grad]
    assert len(frozen) > 0 and {id(p) for p in frozen}.isdisjoint({id(p) for p in parameters})

    _randomize(parameters, seed=1)
    saved = [p.detach().clone() for p in parameters]
    get_backend(adapter).save(tmp_path, models.components())
    _randomize(parameters, seed=2)
    load_adapter_weights_in_place(get_backend(adapter), tmp_path, models)
    current = trainable.unet_parameters + trainable.text_encoder_parameters
    assert [id(p) for p in current] == [id(p) for p in parameters]  # the optimizer's references stay valid
    for before, after in zip(saved, parameters, strict=True):
        assert torch.equal(before, after)


def test_lily_parameters_are_counted_once():
    args = parse_args([*REQUIRED, *SMALL_LILY])
    models = _models(train_text_encoder=False)
    expected = count_lily_parameters(models.unet, LilyConfig(r=4, stride_A=2, num_B=2))
    trainable = _add(args, models)
    assert trainable.num_parameters == expected
    assert trainable.text_encoder_parameters == []


def test_match_lora_budget_picks_the_largest_fitting_rank():
    args = parse_args([*REQUIRED, "--match_lora_budget", "4", "--lily_stride_A", "4", "--lily_num_B", "2"])
    models = _models(train_text_encoder=False)
    budget = count_lora_parameters(models.unet, 4, LilyConfig())
    trainable = _add(args, models)
    chosen = models.unet.lily_adapters["default"].config
    assert (chosen.stride_A, chosen.num_B) == (4, 2)
    assert trainable.num_parameters <= budget
    bigger = count_lily_parameters(_models(False).unet, LilyConfig(r=chosen.r + 1, stride_A=4, num_B=2))
    assert bigger > budget


def test_invalid_lily_settings_are_a_training_error():
    args = parse_args([*REQUIRED, "--lily_num_B", "1"])
    with pytest.raises(TrainingError, match=r"invalid Lily settings.*num_B"):
        _add(args, _models(train_text_encoder=False))
    args = parse_args([*REQUIRED, "--target_modules", "no_such_layer"])
    with pytest.raises(TrainingError, match="invalid Lily settings"):
        _add(args, _models(train_text_encoder=False))


def test_resuming_with_another_adapter_or_config_is_refused(tmp_path):
    lily = parse_args([*REQUIRED, *SMALL_LILY])
    models = _models(train_text_encoder=False)
    _add(lily, models)
    get_backend("lily").save(tmp_path, models.components())
    with pytest.raises(TrainingError, match=r"no pytorch_lora_weights\.safetensors"):
        load_adapter_weights_in_place(get_backend("lora"), tmp_path, models)
    other = _models(train_text_encoder=False)
    _add(parse_args([*REQUIRED, "--lily_r", "8", "--lily_stride_A", "2", "--lily_num_B", "2"]), other)
    with pytest.raises(TrainingError, match="another Lily config"):
        load_adapter_weights_in_place(get_backend("lily"), tmp_path, other)


@pytest.mark.parametrize(
    ("adapter", "extra"),
    [
        ("lily", SMALL_LILY),
        ("lily", ["--match_lora_budget", "2", "--lily_num_B", "2"]),
        ("lora", ["--rank", "3"]),
        *((kind, KIND_FLAGS[kind]) for kind in ("dora", "lokr", "loha")),
        ("lokr", ["--match_lora_budget", "4", "--lokr_decompose_factor", "2"]),
    ],
)
def test_budget_count_is_the_trainable_count(adapter, extra):
    args = parse_args([*REQUIRED, "--adapter", adapter, *extra])
    backend, options = get_backend(adapter), options_from_args(args).adapter
    counted = backend.count_parameters(_models(False).unet, args.target_modules, options)
    assert counted == _add(args, _models(False)).num_parameters > 0


@pytest.mark.parametrize("adapter", list(KIND_FLAGS))
def test_each_backend_detects_only_its_own_file(tmp_path, adapter):
    args = parse_args([*REQUIRED, "--adapter", adapter, *KIND_FLAGS[adapter]])
    models = _models(train_text_encoder=False)
    _add(args, models)
    path = get_backend(adapter).save(tmp_path, models.components())
    assert path.name == get_backend(adapter).weight_name
    with safe_open(str(path), framework="pt") as handle:
        metadata, keys = handle.metadata() or {}, list(handle.keys())
    assert [kind for kind, backend in BACKENDS.items() if backend.detect(metadata, keys)] == [adapter]


def test_unknown_kind_is_one_line():
    with pytest.raises(ValueError, match=r"unknown adapter kind 'boft'; known: lily, lora, dora, lokr, loha"):
        get_backend("boft")


@pytest.mark.parametrize(
    ("adapter", "extra", "rank"),
    [("dora", [], 3), ("loha", [], 2), ("lokr", ["--lokr_decompose_factor", "2"], 7)],
)
def test_match_lora_budget_picks_the_largest_rank_of_each_kind(adapter, extra, rank):
    """On the tiny UNet (64 layers of 64 x 64; LoRA rank 4: 32,768 parameters) the picked rank fits and one more
    does not: DoRA adds a magnitude per output, LoHa has two low-rank pairs, LoKr (2 x 32 split) 4 + 64 r a layer."""
    args = parse_args([*REQUIRED, "--adapter", adapter, "--match_lora_budget", "4", *extra])
    backend, options = get_backend(adapter), options_from_args(args).adapter
    unet = _models(False).unet
    budget = count_lora_parameters(unet, 4)
    picked = backend.rank_for(unet, args.target_modules, options)
    config_at = lambda r: backend.config_at(options, args.target_modules, r)  # noqa: E731
    assert picked == rank
    assert count_peft_parameters(unet, config_at(rank)) <= budget < count_peft_parameters(unet, config_at(rank + 1))
    trainable = _add(args, _models(False))
    assert trainable.num_parameters == count_peft_parameters(unet, config_at(rank))


def test_lokr_whose_largest_size_is_within_the_budget_gets_the_smallest_rank_of_that_size():
    """LoKr split near the square root (8 x 8 on 64-wide layers) is 64 + 64 = 128 parameters a layer once r >= 4,
    whatever r: far below LoRA rank 4's 512, so the budget picks r = 4 (a larger rank adds nothing)."""
    args = parse_args([*REQUIRED, "--adapter", "lokr", "--match_lora_budget", "4"])
    backend, options = get_backend("lokr"), options_from_args(args).adapter
    unet = _models(False).unet
    assert backend.rank_for(unet, args.target_modules, options) == 4
    sizes = [count_peft_parameters(unet, backend.config_at(options, args.target_modules, r)) for r in (3, 4, 9)]
    assert sizes == [64 * (64 + 48), 64 * 128, 64 * 128]
