import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageDraw, ImageFont

from lily_diffusion import LilyConfig, add_lily, remove_lily, save_lily_weights
from lily_diffusion.grids import GridAdapter, comparison_grid, describe_adapter, main
from lily_diffusion.images import _wrap, labelled_grid


@pytest.fixture
def adapter_files(pipe, tmp_path):
    adapter = add_lily(pipe.unet, LilyConfig(r=4, stride_A=2, num_B=2, init_weights=False))
    lily_path = save_lily_weights(tmp_path / "lily", unet=pipe.unet)
    lily_count = adapter.num_parameters
    remove_lily(pipe.unet)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=lora_state)
    lora_count = sum(t.numel() for t in lora_state.values())
    return lily_path, lily_count, tmp_path / "lora", lora_count


def test_describe_adapter_tells_lily_from_lora_and_counts(adapter_files):
    lily_path, lily_count, lora_dir, lora_count = adapter_files
    lily = describe_adapter("ours", lily_path.parent)
    lora = describe_adapter("theirs", lora_dir)
    assert (lily.kind, lily.num_parameters) == ("lily", lily_count)
    assert (lora.kind, lora.num_parameters) == ("lora", lora_count)
    assert lily.label == f"ours (lily, {lily_count:,} params)"
    with pytest.raises(FileNotFoundError, match="No adapter weights"):
        describe_adapter("none", lora_dir / "missing")


def test_grid_has_one_labelled_cell_per_prompt_seed_and_adapter(adapter_files, tiny_sdxl_dir):
    lily_path, _, lora_dir, _ = adapter_files
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    adapters = [
        GridAdapter("base", None, "base", 0),
        describe_adapter("lily", lily_path),
        describe_adapter("lora", lora_dir),
    ]
    grid = comparison_grid(pipe, adapters, ["a photo of sks star", "a red circle"], [0, 1], 2, 5.0, 16, cell_size=32)
    assert grid.width > 3 * 32 and grid.height > 4 * 32
    cells = np.asarray(grid)[-4 * 32 :, -3 * 32 :].astype(int)  # the image body sits bottom-right
    columns = [cells[:, c * 32 : (c + 1) * 32] for c in range(3)]
    assert np.abs(columns[0] - columns[1]).max() > 0  # lily changes the images
    assert np.abs(columns[0] - columns[2]).max() > 0  # so does lora
    assert np.abs(columns[0][:32] - columns[0][32:64]).max() > 0  # seeds differ
    # the adapters were unloaded again: the base column regenerates identically
    again = comparison_grid(pipe, adapters[:1], ["a photo of sks star", "a red circle"], [0, 1], 2, 5.0, 16, 32)
    assert np.array_equal(np.asarray(again)[-4 * 32 :, -32:], cells[:, :32])


def test_labelled_grid_writes_labels_in_the_margins():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    grid = labelled_grid([[red, red], [blue, blue]], ["row one", "row two"], ["first column", "second"], cell_size=40)
    pixels = np.asarray(grid)
    assert pixels.shape[1] > 80 and pixels.shape[0] > 80
    margin = pixels[: pixels.shape[0] - 80]
    assert (margin < 128).any()  # dark text on the white label band
    assert (pixels[-80:, -80:-40] == [255, 0, 0]).all() and (pixels[-80:, -40:] == [0, 0, 255]).all()


def test_cli_writes_the_png(adapter_files, tiny_sdxl_dir, tmp_path):
    lily_path, _, lora_dir, _ = adapter_files
    out = tmp_path / "out" / "grid.png"
    status = main(
        [
            "--pretrained_model_name_or_path",
            str(tiny_sdxl_dir),
            "--adapter",
            f"lily={lily_path}",
            "--adapter",
            f"lora={lora_dir}",
            "--prompt",
            "a photo of sks star",
            "--seed",
            "3",
            "--num_inference_steps",
            "2",
            "--output",
            str(out),
        ]
    )
    assert status == 0  # the console script passes it to sys.exit
    assert Image.open(out).size[0] > 3 * 16
    with pytest.raises(SystemExit, match="No adapter weights"):
        main(
            ["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--adapter", f"x={tmp_path}/nope", "--prompt", "p"]
        )


def test_long_column_labels_are_cut_to_the_cell_width():
    draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    font = ImageFont.load_default()
    label = "lily-lr0.001-noprior-seed2 (lily, 32,000 params)"
    lines = _wrap(label, 64, font, draw)
    assert len(lines) >= 3
    assert all(draw.textlength(line, font=font) <= 60 for line in lines)
    assert "".join(lines).replace(" ", "") == label.replace(" ", "")
