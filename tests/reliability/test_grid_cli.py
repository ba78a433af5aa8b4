"""`lily-grid` in normal and hostile use: exit 0, one-line errors, every adapter checked before generating."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file

from lily_diffusion import LilyConfig, add_lily, save_lily_weights
from lily_diffusion.grids import check_adapter_fits, describe_adapter, main
from toyworld.tiny_sdxl import build_unet

REPO = Path(__file__).resolve().parents[2]
LILY = LilyConfig(r=4, stride_A=2, num_B=2, init_weights=False)


def save_lora(unet, folder):
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sdxl_dir):
    """Adapters for the tiny pipeline, and for a UNet of other widths (the wrong base)."""
    folder = tmp_path_factory.mktemp("adapters")
    unet = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).unet
    torch.manual_seed(0)
    add_lily(unet, LILY)
    lily = save_lily_weights(folder / "lily", unet=unet)
    lora = save_lora(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).unet, folder / "lora")
    wide_config = {**dict(build_unet().config), "block_out_channels": (32, 96), "attention_head_dim": (2, 6)}
    wide = type(unet)(**wide_config)
    add_lily(wide, LILY)
    wide_lily = save_lily_weights(folder / "wide_lily", unet=wide)
    wide_lora = save_lora(type(unet)(**wide_config), folder / "wide_lora")
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(lily.read_bytes()[:3000])
    pickle = folder / "adapter.bin"
    torch.save({"unet.to_q.lora_A.weight": torch.zeros(2, 64)}, pickle)
    return {"lily": lily, "lora": lora, "wide_lily": wide_lily, "wide_lora": wide_lora,
            "truncated": truncated, "pickle": pickle}  # fmt: skip


def grid_args(base, *extra):
    return ["--pretrained_model_name_or_path", str(base), "--prompt", "a photo of sks star", "--seed", "3",
            "--num_inference_steps", "2", "--resolution", "16", *extra]  # fmt: skip


def usage_error(capsys, argv):
    """main(argv) must stop with argparse's exit status 2 and one line naming the problem."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def file_error(argv):
    """main(argv) must stop with exit status 1 and one line (no traceback)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    message = caught.value.code
    assert isinstance(message, str) and "\n" not in message  # printed by Python, exit status 1
    return message


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Counts image generations (the real pipeline still runs)."""
    calls = []
    real = StableDiffusionXLPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("prompt"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", counting)
    return calls


def test_success_returns_0_and_dtype_is_used(files, tiny_sdxl_dir, tmp_path, pipeline_calls):
    output = tmp_path / "sub" / "grid.png"
    argv = grid_args(tiny_sdxl_dir, "--adapter", f"lily={files['lily']}", "--dtype", "bf16", "--output", str(output))
    assert main(argv) == 0
    assert Image.open(output).size[0] > 2 * 16 and len(pipeline_calls) == 2  # base and lily columns
    fp32 = tmp_path / "fp32.png"
    assert main(grid_args(tiny_sdxl_dir, "--adapter", f"lily={files['lily']}", "--output", str(fp32))) == 0
    assert not np.array_equal(np.asarray(Image.open(output)), np.asarray(Image.open(fp32)))  # bf16 really used


@pytest.mark.parametrize("kind", ["wide_lily", "wide_lora"])
def test_a_mismatched_adapter_fails_before_anything_is_generated(files, tiny_sdxl_dir, tmp_path, pipeline_calls, kind):
    output = tmp_path / "grid.png"
    argv = grid_args(tiny_sdxl_dir, "--adapter", f"good={files['lily']}", "--adapter", f"bad={files[kind]}")
    message = file_error([*argv, "--output", str(output)])
    assert message.startswith(f"lily-grid: error: adapter 'bad' ({files[kind]}) does not fit the base model: ")
    expected = "saved for a model of other widths" if kind == "wide_lily" else "size mismatch for"
    assert expected in message
    assert pipeline_calls == [] and not output.exists()


def test_checking_adapters_leaves_the_pipeline_as_it_was(files, tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)

    def image():
        generator = torch.Generator().manual_seed(0)
        return pipe("a star", num_inference_steps=2, height=16, width=16, generator=generator, output_type="pt").images

    before = image()
    for kind in ("lily", "lora"):
        check_adapter_fits(pipe, describe_adapter(kind, files[kind]))
    with pytest.raises(ValueError, match="does not fit the base model"):
        check_adapter_fits(pipe, describe_adapter("wide", files["wide_lora"]))
    assert not hasattr(pipe.unet, "lily_adapters") and not getattr(pipe.unet, "peft_config", None)
    assert torch.equal(image(), before)


def test_a_lora_that_only_partly_fits_is_refused(files, tiny_sdxl_dir, tmp_path):
    tensors = load_file(str(files["lora"]))
    fitting = sum(t.numel() for t in tensors.values())
    extra = {
        k.replace("down_blocks.1", "down_blocks.7"): v.clone() for k, v in tensors.items() if "down_blocks.1" in k
    }
    partial = tmp_path / "partial.safetensors"
    save_file({**tensors, **extra}, str(partial))
    total = fitting + sum(t.numel() for t in extra.values())
    message = file_error(grid_args(tiny_sdxl_dir, "--adapter", f"p={partial}", "--output", str(tmp_path / "g.png")))
    assert message.endswith(f"only {fitting:,} of its {total:,} LoRA weights found a module of the pipeline "
                            "(saved for another model?).")  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "is not a readable safetensors file (Error while deserializing header"),
        ("pickle", "is not a readable safetensors file (Error while deserializing header"),
    ],
)
def test_unreadable_adapter_files(files, tiny_sdxl_dir, tmp_path, kind, message):
    text = file_error(grid_args(tiny_sdxl_dir, "--adapter", f"x={files[kind]}", "--output", str(tmp_path / "g.png")))
    assert text.startswith(f"lily-grid: error: {files[kind]} {message}")
    assert "a pickle .bin/.pt file, which is never loaded since it can run code" in text


def test_a_folder_with_only_a_pickle_is_refused(tiny_sdxl_dir, tmp_path):
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04K\x01.")
    text = file_error(grid_args(tiny_sdxl_dir, "--adapter", f"x={tmp_path}", "--output", str(tmp_path / "g.png")))
    assert text.endswith("found pytorch_lora_weights.bin, but pickle files are not loaded (they can run code).")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no_base"], "--no_base leaves no column to draw: give at least one --adapter"),
        (["--num_inference_steps", "0"], "argument --num_inference_steps: must be a positive integer, got '0'"),
        (["--num_inference_steps", "-3"], "argument --num_inference_steps: must be a positive integer, got '-3'"),
        (["--resolution", "0"], "argument --resolution: must be a positive integer, got '0'"),
        (["--resolution", "20"], "--resolution must be a multiple of 8 (SDXL's VAE and UNet need it), got 20"),
        (["--cell_size", "0"], "argument --cell_size: must be a positive integer, got '0'"),
        (["--guidance_scale", "nan"], "argument --guidance_scale: must be a finite number, got 'nan'"),
        (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2**64 - 1, got '-1'"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8' (choose from "),  # quoting varies by Python
        (["--adapter", "lily"], "--adapter takes NAME=PATH with both parts non-empty, got 'lily'"),
        (["--adapter", "x="], "--adapter takes NAME=PATH with both parts non-empty, got 'x='"),
        (["--adapter", "a=p", "--adapter", "a=q"], "--adapter names must differ, got ['a', 'a']"),
        (["--output", "grid.txt"], "--output grid.txt has no image suffix PIL can write (such as .png or .jpg)"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(tiny_sdxl_dir, capsys, extra, message):
    assert usage_error(capsys, grid_args(tiny_sdxl_dir, *extra)).startswith(f"lily-grid: error: {message}")


def test_bad_output_and_base_paths_are_usage_errors(tiny_sdxl_dir, tmp_path, capsys):
    line = usage_error(capsys, grid_args(tiny_sdxl_dir, "--output", str(tmp_path)))
    assert line == f"lily-grid: error: --output {tmp_path} is a folder; give a file name such as {tmp_path}/grid.png"
    (tmp_path / "file").write_text("x")
    line = usage_error(capsys, grid_args(tiny_sdxl_dir, "--output", str(tmp_path / "file" / "g.png")))
    assert line == f"lily-grid: error: --output {tmp_path}/file/g.png is under {tmp_path}/file, which is a file"
    line = usage_error(capsys, grid_args(tmp_path / "missing"))
    assert line == f"lily-grid: error: --pretrained_model_name_or_path {tmp_path}/missing: no such folder"
    line = usage_error(capsys, grid_args(tmp_path))
    assert line.endswith("has no model_index.json: not a diffusers pipeline folder")


def run_cli(entry, *argv, cwd):
    code = {"module": ["-m", "lily_diffusion.grids"], "script": ["-c", _console_script()]}[entry]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *code, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _console_script():
    """What the installed `lily-grid` script runs: the [project.scripts] entry called through sys.exit."""
    lines = (REPO / "pyproject.toml").read_text().splitlines()
    line = next(text for text in lines if text.startswith("lily-grid ="))
    module, function = line.split('"')[1].split(":")
    return f"import sys; from {module} import {function}; sys.exit({function}())"


def test_console_script_and_module_exit_codes(files, tiny_sdxl_dir, tmp_path):
    ok = run_cli("module", *grid_args(tiny_sdxl_dir, "--adapter", f"l={files['lily']}", "--output", "g.png"),
                 cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "g.png").is_file() and "wrote g.png" in ok.stderr
    assert run_cli("script", *grid_args(tiny_sdxl_dir, "--output", "g2.png"), cwd=tmp_path).returncode == 0
    bad = run_cli("script", *grid_args(tiny_sdxl_dir, "--adapter", f"w={files['wide_lily']}"), cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("lily-grid: error: adapter 'w' (")
    usage = run_cli("module", *grid_args(tiny_sdxl_dir, "--no_base"), cwd=tmp_path)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_runs_on_the_bundled_model_in_every_dtype(tmp_path):
    for dtype in ("fp32", "fp16", "bf16"):
        output = tmp_path / f"{dtype}.png"
        model = str(REPO / "assets" / "toy-sdxl-base")
        argv = ["--pretrained_model_name_or_path", model, "--prompt", "a photo of a star",
                "--num_inference_steps", "2", "--dtype", dtype, "--output", str(output)]  # fmt: skip
        assert main(argv) == 0
        assert np.asarray(Image.open(output)).std() > 5
