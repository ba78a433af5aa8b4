"""peft's other adapters as training backends (`--adapter dora|lokr|loha`): trained through the script's main on
the tiny pipeline, saved, loaded into a fresh pipeline as a user would, drawn by lily-grid, and strangers' files
refused in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lily_diffusion import LycorisFileError, load_lycoris_weights
from lily_diffusion.backends import BACKENDS, get_backend
from lily_diffusion.grids import GridAdapter, describe_adapter, generate_for_adapter
from lily_diffusion.grids import main as grid_main
from lily_diffusion.training.adapters import AdaptedModels, add_adapters
from lily_diffusion.training.args import options_from_args, parse_args
from tests.helpers import generate_tiny
from tests.training.test_train_e2e import PROMPT, scalars

KIND_FLAGS = {  # DoRA on the UNet only: diffusers' loader drops the text encoders' DoRA magnitudes (refused)
    "dora": ["--adapter", "dora", "--rank", "2"],
    "lokr": ["--adapter", "lokr", "--rank", "3", "--lokr_decompose_factor", "2", "--train_text_encoder"],
    "loha": ["--adapter", "loha", "--rank", "2", "--train_text_encoder"],
}
ZERO_AT_START = {"dora": "up.weight", "lokr": "lokr_w1", "loha": "hada_w2_b"}  # the factor peft starts at 0
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
BASE = GridAdapter("base", None, "base", 0)


def folder_digest(folder: Path) -> str:
    """One hash of every file under `folder` (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def common_args(tiny_sdxl_path: Path, subject_dir: Path) -> list[object]:
    return [
        "--pretrained_model_name_or_path", tiny_sdxl_path, "--resolution", "16", "--train_batch_size", "2",
        "--seed", "0", "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT, "--learning_rate", "1e-2",
    ]  # fmt: skip


@pytest.fixture(scope="module", params=list(KIND_FLAGS))
def trained(request, run_main, tiny_sdxl_path, subject_dir, tmp_path_factory) -> tuple[str, Path]:
    """One run of each kind: 4 steps, UNet (and both text encoders but for DoRA), TensorBoard logs."""
    kind = request.param
    out = tmp_path_factory.mktemp(kind)
    before = folder_digest(tiny_sdxl_path)
    run_main([
        *common_args(tiny_sdxl_path, subject_dir), *KIND_FLAGS[kind], "--output_dir", out, "--max_train_steps", "4",
        *(["--text_encoder_lr", "1e-2"] if "--train_text_encoder" in KIND_FLAGS[kind] else []),
        "--report_to", "tensorboard", "--validation_prompt", PROMPT, "--num_validation_images", "1",
        "--num_validation_inference_steps", "2",
    ])  # fmt: skip
    assert (out / "validation" / "final.png").is_file()  # drawn with the saved file loaded into a fresh pipeline
    assert folder_digest(tiny_sdxl_path) == before  # the base model is read, never written
    return kind, out


def in_memory_pipeline(path: Path, kind: str, out: Path) -> StableDiffusionXLPipeline:
    """A fresh pipeline with the adapter built as training builds it (the backend's `add`, the script's flags)
    and the trained values copied in as a resume copies them: the trained model, without the user's loader."""
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    required = ["--pretrained_model_name_or_path", str(path), "--instance_data_dir", "d", "--instance_prompt", "p"]
    args = parse_args([*required, *KIND_FLAGS[kind]])
    models = AdaptedModels(pipe.unet)
    if args.train_text_encoder:
        models = AdaptedModels(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    add_adapters(get_backend(kind), options_from_args(args).adapter, models, mixed_precision=False)
    get_backend(kind).load_in_place(out, models.components())
    return pipe


def test_trains_saves_and_loads_like_the_trained_model(trained, tiny_sdxl_path):
    kind, out = trained
    backend = get_backend(kind)
    losses = scalars(out, "loss")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    path = out / backend.weight_name
    assert [p.name for p in out.glob("*.safetensors")] == [backend.weight_name]
    with safe_open(str(path), framework="pt") as handle:
        metadata, keys = handle.metadata() or {}, list(handle.keys())
    assert [k for k, b in BACKENDS.items() if b.detect(metadata, keys)] == [kind]
    tensors = load_file(str(path))
    components = COMPONENTS if "--train_text_encoder" in KIND_FLAGS[kind] else ("unet",)
    assert {key.split(".")[0] for key in tensors} == set(components)
    for component in components:  # training moved the factor that starts at zero (SDXL reads the text encoders'
        # penultimate layer, so their last layer gets no gradient: some of theirs stay zero)
        moved = [
            t.abs().max() > 0 for k, t in tensors.items() if k.startswith(f"{component}.") and ZERO_AT_START[kind] in k
        ]
        assert moved and (all(moved) if component == "unet" else any(moved)), component

    base = generate_tiny(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path))
    user = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    backend.load_into_pipeline(user, out)
    loaded = generate_tiny(user)
    in_memory = generate_tiny(in_memory_pipeline(tiny_sdxl_path, kind, out))
    torch.testing.assert_close(loaded, in_memory, rtol=0, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-3  # the adapter changes the image

    card = (out / "README.md").read_text()
    _, load = backend.load_code(str(out.resolve()))
    assert f"- {kind}\n" in card and f"DreamBooth {backend.display_name} adapter" in card and load in card


def test_lily_grid_column_picks_the_kind_and_leaves_the_base(trained, tiny_sdxl_path, tmp_path):
    kind, out = trained
    adapter = describe_adapter(kind, out)
    assert adapter.kind == kind and adapter.num_parameters == sum(
        t.numel() for t in load_file(str(adapter.path)).values()
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    column = {"prompts": [PROMPT], "seeds": [0], "num_inference_steps": 2, "guidance_scale": 5.0, "size": 16}
    before = generate_for_adapter(pipe, BASE, **column)
    with_adapter = generate_for_adapter(pipe, adapter, **column)
    after = generate_for_adapter(pipe, BASE, **column)
    assert np.array_equal(np.asarray(before[0]), np.asarray(after[0]))  # unloaded: the base model again
    assert not np.array_equal(np.asarray(with_adapter[0]), np.asarray(before[0]))
    grid = tmp_path / "grid.png"
    argv = ["--pretrained_model_name_or_path", str(tiny_sdxl_path), "--adapter", f"{kind}={out}", "--prompt", PROMPT]
    assert grid_main([*argv, "--seed", "0", "--num_inference_steps", "2", "--output", str(grid)]) == 0
    assert grid.is_file()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--train_text_encoder", "DoRA with --train_text_encoder is not supported"),
        ("--output_kohya_format", "--output_kohya_format is not supported with DoRA"),
    ],
)
def test_dora_combinations_diffusers_cannot_save_are_refused(
    tiny_sdxl_path, subject_dir, tmp_path, run_main, flag, message
):
    """diffusers' load_lora_weights would drop the text encoders' DoRA magnitudes, and its Kohya conversion keeps
    peft's magnitude names: refused in one sentence, for both spellings, before anything is written."""
    for flags in (["--adapter", "dora"], ["--adapter", "lora", "--use_dora"]):
        out = tmp_path / flags[1]
        with pytest.raises(pytest.fail.Exception, match=message):
            run_main([*common_args(tiny_sdxl_path, subject_dir), *flags, flag, "--output_dir", out])
        assert not out.exists()


def test_dora_is_lora_with_use_dora(run_main, tiny_sdxl_path, subject_dir, tmp_path):
    """`--adapter dora` and diffusers' `--adapter lora --use_dora` give the same weights for the same seed."""
    common = [
        *common_args(tiny_sdxl_path, subject_dir),
        "--max_train_steps",
        "2",
        "--rank",
        "2",
        "--report_to",
        "none",
    ]
    run_main([*common, "--adapter", "dora", "--output_dir", tmp_path / "dora"])
    run_main([*common, "--adapter", "lora", "--use_dora", "--output_dir", tmp_path / "lora"])
    a = load_file(str(tmp_path / "dora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any("lora_magnitude_vector" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def corrupt(source: Path, target: Path, change: str) -> Path:
    """A copy of a LoKr/LoHa file with one thing wrong."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    config = json.loads(metadata["config.unet"])
    if change == "json":
        metadata["config.unet"] = "{not json"
    elif change == "field":
        metadata["config.unet"] = json.dumps({**config, "target_modules": ".*"})
    elif change == "rank":
        metadata["config.unet"] = json.dumps({**config, "r": 10**9})
    elif change == "type":
        metadata["config.unet"] = json.dumps({**config, "alpha": "big"})
    elif change == "shape":
        key = next(k for k in tensors if k.startswith("unet."))
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    elif change == "nan":
        key = next(k for k in tensors if k.startswith("unet."))
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    elif change == "layer":
        key = next(k for k in tensors if k.startswith("unet.") and ".to_q." in k)
        tensors[key.replace(".to_q.", ".no_such_layer.")] = tensors.pop(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.mark.parametrize("trained", ["lokr", "loha"], indirect=True)
@pytest.mark.parametrize("change", ["json", "field", "rank", "type", "shape", "nan", "layer"])
def test_malformed_files_are_refused_in_one_line(trained, tiny_sdxl_path, tmp_path, change, capsys):
    kind, out = trained
    bad = corrupt(out / get_backend(kind).weight_name, tmp_path / "bad" / get_backend(kind).weight_name, change)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    with pytest.raises(LycorisFileError) as caught:
        load_lycoris_weights(pipe, bad)
    assert len(str(caught.value).splitlines()) == 1
    assert not any("lokr_" in n or "hada_" in n for n, _ in pipe.unet.named_parameters())  # nothing was added
    with pytest.raises(SystemExit) as exit_info:
        grid_main(["--pretrained_model_name_or_path", str(tiny_sdxl_path), "--adapter", f"x={bad}",
                   "--prompt", "p", "--output", str(tmp_path / "g.png")])  # fmt: skip
    assert str(exit_info.value).startswith("lily-grid: error:") and len(str(exit_info.value).splitlines()) == 1
