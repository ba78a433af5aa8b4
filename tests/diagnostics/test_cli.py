"""`lily-inspect` end to end on a tiny pipeline: the table, the JSON and the PNGs; bad inputs get one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lily_diffusion import LilyConfig, add_lily, save_lily_weights
from lily_diffusion.diagnostics.cli import main
from lily_diffusion.diagnostics.report import PLOT_NAMES
from toyworld.tiny_sdxl import build_unet

CONFIG = LilyConfig(r=2, stride_A=2, num_B=3, init_weights=False)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def files(pipe, tmp_path) -> tuple[Path, Path]:
    """A Lily file on the tiny UNet and a rank-2 LoRA file (peft key layout) on the same layers."""
    adapter = add_lily(pipe.unet, CONFIG)
    lily = save_lily_weights(tmp_path / "lily", unet=pipe.unet)
    tensors = {}
    for path, layer in adapter.layers.items():
        tensors[f"unet.{path}.lora_A.weight"] = torch.randn(2, layer.in_features)
        tensors[f"unet.{path}.lora_B.weight"] = torch.randn(layer.out_features, 2)
    lora = tmp_path / "lora.safetensors"
    save_file(tensors, str(lora))
    return lily, lora


def error_line(capsys, args: list[str]) -> str:
    """Run the CLI expecting a refusal; return its one line (SystemExit message or argparse's last line)."""
    with pytest.raises(SystemExit) as raised:
        main(args)
    code = raised.value.code
    if isinstance(code, str):
        assert "\n" not in code and "Traceback" not in code
        return code
    assert code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_on_a_tiny_pipeline_writes_table_json_and_plots(files, tiny_sdxl_dir, tmp_path, capsys):
    lily, lora = files
    out = tmp_path / "out"
    args = [str(lily), "--lora", str(lora), "--pipeline", str(tiny_sdxl_dir), "--out", str(out)]
    args += ["--prompts", "a photo of sks star", "a red circle", "--num_inference_steps", "3"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "erank stacked" in table and "LoRA erank" in table and "mean_router_entropy" in table
    assert (out / "table.txt").read_text().strip() == table.strip()
    report = json.loads((out / "report.json").read_text())
    layers = report["layers"]
    assert len(layers) == len(report["weights"]["router_norms"]) > 0
    assert report["prompts"] == ["a photo of sks star", "a red circle"] and len(report["timesteps"]) == 3
    for layer in layers:
        assert layer["inputs"] == 6 and layer["lora_rank"] == 2
        assert layer["lora_effective_rank"] <= 2 + 1e-9
        assert layer["per_input_effective_rank"] <= CONFIG.r + 1e-9
    assert report["summary"]["lora_layers"] == len(layers)
    for name in PLOT_NAMES:
        assert (out / name).read_bytes().startswith(PNG), name


def test_weights_only_mode(files, tmp_path, capsys):
    lily, lora = files
    out = tmp_path / "weights-only"
    assert main([str(lily.parent), "--lora", str(lora), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "pool erank" in table and "erank stacked" not in table
    report = json.loads((out / "report.json").read_text())
    assert report["layers"] == [] and report["heatmap"] == {}
    assert not (out / PLOT_NAMES[0]).exists()
    assert all((out / name).read_bytes().startswith(PNG) for name in PLOT_NAMES[1:])
    assert main([str(lily), "--out", str(out), "--no_plots"]) == 0


def test_bad_inputs_are_refused_with_one_line(files, tiny_sdxl_dir, tmp_path, capsys):
    lily, lora = files
    pipeline = ["--pipeline", str(tiny_sdxl_dir), "--no_plots", "--out", str(tmp_path / "o")]
    assert "No Lily weights file" in error_line(capsys, [str(tmp_path / "missing"), "--no_plots"])
    assert "looks like a LoRA file" in error_line(capsys, [str(lora), "--no_plots"])
    assert "is a Lily file" in error_line(capsys, [str(lily), "--lora", str(lily), "--no_plots"])
    assert "pass it as the ADAPTER" in error_line(capsys, [str(lily), "--lora", str(lily.parent), "--no_plots"])
    lora_folder = tmp_path / "lora-folder"
    lora_folder.mkdir()
    (lora_folder / "pytorch_lora_weights.safetensors").write_bytes(lora.read_bytes())
    assert "pass it with --lora" in error_line(capsys, [str(lora_folder), "--no_plots"])
    assert "given without --pipeline" in error_line(capsys, [str(lily), "--prompts", "a star"])
    assert "multiple of 8" in error_line(capsys, [str(lily), *pipeline, "--resolution", "12"])
    assert "is a file" in error_line(capsys, [str(lily), "--no_plots", "--out", str(lora)])
    assert "which is a file" in error_line(capsys, [str(lily), "--no_plots", "--out", str(lora / "sub")])
    assert "not a diffusers pipeline folder" in error_line(
        capsys, [str(lily), "--pipeline", str(tmp_path), "--no_plots"]
    )
    # an adapter saved for a UNet of other widths
    other = build_unet(channels=(16, 32))
    add_lily(other, CONFIG)
    mismatched = save_lily_weights(tmp_path / "other", unet=other)
    assert "other widths" in error_line(capsys, [str(mismatched), *pipeline])
    # a LoRA whose layers the base does not have
    stray = tmp_path / "stray.safetensors"
    save_file(
        {"unet.nowhere.lora_A.weight": torch.zeros(2, 4), "unet.nowhere.lora_B.weight": torch.zeros(4, 2)}, str(stray)
    )
    assert "does not fit the base pipeline" in error_line(capsys, [str(lily), "--lora", str(stray), *pipeline])
    assert not (tmp_path / "o").exists()  # nothing written for a refused run
