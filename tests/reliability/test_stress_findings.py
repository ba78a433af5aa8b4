"""What `python -m scripts.stress_inputs` found, each fixed and kept fixed: one line instead of a traceback, a hang
or an input silently ignored.

Flags: counts past 2**31 - 1 overflowed torch or itertools, a huge --dataloader_num_workers hung, --snr_gamma past
float32 overflowed the loss, an empty path flag meant the current folder, --repeats that makes billions of examples
exhausted memory, --logging_dir under a file crashed the tracker, an adapter too large for memory gave a traceback.
Files: JSON nested 100,000 deep (in a file's Lily config or a caption line) raised RecursionError, a 50 MB caption
took minutes to tokenize. lily-grid: a base that loads but cannot generate (no tokenizer files), more steps than the
scheduler has, a grid past PIL's pixel limit, a guidance scale past float32 and a base config with impossible sizes
ended in tracebacks. `load_lily_weights(pipe, ..., component=...)` ignored `component` on a pipeline.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from lily_diffusion import LilyConfig, LilyFileError, add_lily, load_lily_weights, save_lily_weights
from lily_diffusion.adapter import lily_adapters
from lily_diffusion.config import TEXT_ENCODER_TARGET_MODULES
from lily_diffusion.grids import main as grid_main
from lily_diffusion.training import TrainingError, parse_args
from lily_diffusion.training.conditioning import truncation_warnings
from lily_diffusion.training.data import MAX_CAPTION_CHARS, read_captions, sidecar_caption
from toyworld.tiny_sdxl import build_tokenizer

REQUIRED = ["--pretrained_model_name_or_path", "model", "--instance_data_dir", "data", "--instance_prompt", "sks"]
DEEP_JSON = "[" * 100_000 + "]" * 100_000


def flag_error(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """parse_args must exit with status 2 and print one line; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*REQUIRED, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lily_r", "2147483648"], "--lily_r 2147483648 is too large: at most 2147483647 (2**31 - 1)"),
        (["--repeats", str(10**20)], f"--repeats {10**20} is too large: at most 2147483647 (2**31 - 1)"),
        (["--gradient_accumulation_steps", str(10**20)], "--gradient_accumulation_steps 100000000000000000000 is"),
        (["--train_batch_size", str(10**20)], "--train_batch_size 100000000000000000000 is too large"),
        (["--dataloader_num_workers", "257"], "--dataloader_num_workers 257 is too many: at most 256"),
        (["--snr_gamma", "1e39"], "--snr_gamma 1e+39 is too large: the trained parameters are float32"),
        (["--output_dir", ""], "--output_dir is empty; give a path (an empty one would mean the current folder)"),
        (["--instance_data_dir", ""], "--instance_data_dir is empty"),
        (["--config_file", ""], "--config_file is empty"),
        (["--resume_from_checkpoint", ""], "--resume_from_checkpoint is empty"),
        (["--lily_scaling", "0"], "--lily_scaling 0 switches the adapter off: nothing would train"),
    ],
)
def test_absurd_counts_and_empty_paths_are_one_line(capsys, extra, message):
    assert flag_error(capsys, *extra).startswith(f"train_dreambooth_lily.py: error: {message}")


def test_the_largest_counts_still_parse():
    args = parse_args([*REQUIRED, "--checkpointing_steps", "2147483647", "--dataloader_num_workers", "256"])
    assert (args.checkpointing_steps, args.dataloader_num_workers) == (2**31 - 1, 256)
    assert parse_args([*REQUIRED, "--seed", str(2**32 - 1)]).seed == 2**32 - 1  # seeds keep their own range


def test_repeats_that_make_billions_of_examples_are_refused_before_any_model(train, tmp_path):
    with pytest.raises(TrainingError) as error:
        train(tmp_path / "out", "--repeats", "2147483647")
    assert "examples per epoch, more than 10,000,000; lower --repeats" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_logging_dir_under_a_file_is_refused_before_any_model(train, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError) as error:
        train(tmp_path / "out", "--report_to", "tensorboard", "--logging_dir", tmp_path / "file" / "logs")
    assert str(error.value) == f"--logging_dir {tmp_path}/file/logs is under a file ({tmp_path}/file), not a folder"


@contextlib.contextmanager
def address_space_limit(extra_bytes: int) -> Iterator[None]:
    """This process may map at most `extra_bytes` more than it has now (the limit is lifted afterwards)."""
    with open("/proc/self/status") as status:
        used_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used_kb * 1024 + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize(("flags", "message"), [
    (["--lily_r", "2147483647"], "not enough memory for the unet's Lily adapter (r=2147483647, num_B=2): "),
    (["--adapter", "lora", "--rank", "2147483647"], "not enough memory for a LoRA of rank 2147483647: "),
])  # fmt: skip
def test_an_adapter_too_large_for_memory_is_one_line(train, tmp_path, flags, message):
    with address_space_limit(2 << 30), pytest.raises(TrainingError) as error:
        train(tmp_path / "out", *flags)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# Files: JSON bombs and huge captions.


def test_a_lily_config_nested_too_deeply_is_refused(pipe, tiny_sdxl_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^LilyConfig JSON nests arrays or objects too deeply to be a config\.$"):
        LilyConfig.from_json(DEEP_JSON)
    add_lily(pipe.unet, LilyConfig(r=4, stride_A=2, num_B=2))
    path = save_lily_weights(tmp_path, unet=pipe.unet)
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle)
        metadata = {**handle.metadata(), "lily_config.unet": DEEP_JSON}
    save_file(tensors, str(path), metadata=metadata)
    target = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    with pytest.raises(LilyFileError, match="invalid Lily config for unet: LilyConfig JSON nests"):
        load_lily_weights(target, path)
    assert lily_adapters(target.unet) == {}


def test_a_caption_line_nested_too_deeply_is_one_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n' + DEEP_JSON + "\n")
    with pytest.raises(TrainingError) as error:
        read_captions(tmp_path, None)
    assert str(error.value) == f"{tmp_path / 'metadata.jsonl'}, line 2: arrays or objects nested too deeply"


def test_captions_longer_than_the_limit_are_refused(tmp_path):
    longest = "x" * MAX_CAPTION_CHARS
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": longest}) + "\n")
    assert read_captions(tmp_path, None) == {"a.png": longest}
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": longest + "y"}) + "\n")
    with pytest.raises(TrainingError) as error:
        read_captions(tmp_path, None)
    assert str(error.value) == (
        f"{tmp_path / 'metadata.jsonl'}, line 1: the caption has 100,001 characters, more than the 100,000 a "
        "caption may have (the text encoders read only its first 77 tokens)"
    )
    (tmp_path / "b.txt").write_text("z" * 50_000_000)
    with pytest.raises(TrainingError, match=r"b\.txt: the caption has 50,000,000 characters"):
        sidecar_caption(tmp_path / "b.png")


def test_the_truncation_warning_quotes_a_long_caption_in_short():
    warnings = truncation_warnings([build_tokenizer()], {"captions": ["a photo of sks star " * 5000]})
    assert len(warnings) == 1 and len(warnings[0]) < 400 and warnings[0].endswith("...")


# lily-grid.


def grid_args(base: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--prompt", "a photo of sks star", "--seed", "3",
            "--num_inference_steps", "2", "--resolution", "16", *extra]  # fmt: skip


def grid_exit(argv: list[str]) -> int | str | None:
    """The SystemExit code of lily-grid: 2 for a usage error, a one-line message (exit status 1) for the rest."""
    with pytest.raises(SystemExit) as caught:
        grid_main(argv)
    return caught.value.code


def linked_copy(base: Path, target: Path, copied: str) -> Path:
    """`base` with every component linked, except `copied`, which is a real copy to break."""
    target.mkdir()
    for entry in base.iterdir():
        if entry.name == copied:
            shutil.copytree(entry, target / entry.name)
        else:
            (target / entry.name).symlink_to(entry)
    return target


def test_a_base_config_with_impossible_sizes_is_one_line(tiny_sdxl_dir, tmp_path):
    base = linked_copy(tiny_sdxl_dir, tmp_path / "base", "unet")
    config = json.loads((base / "unet" / "config.json").read_text())
    (base / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": -4}))
    code = grid_exit(grid_args(base, "--output", str(tmp_path / "g.png")))
    assert isinstance(code, str) and "\n" not in code
    assert code.startswith(f"lily-grid: error: cannot load the base model '{base}': Trying to create tensor")
    assert not (tmp_path / "g.png").exists()


def test_a_base_without_tokenizer_files_is_refused_before_generating(tiny_sdxl_dir, tmp_path):
    base = linked_copy(tiny_sdxl_dir, tmp_path / "base", "tokenizer")
    for path in (base / "tokenizer").iterdir():
        path.unlink()
    code = grid_exit(grid_args(base, "--output", str(tmp_path / "g.png")))
    assert code == (
        "lily-grid: error: the base model's tokenizer takes 1,000,000,000,000,000,019,884,624,838,656 tokens but "
        "its text_encoder only 16 (are the tokenizer files missing?)."
    )


def test_more_steps_than_the_scheduler_has_are_refused(tiny_sdxl_dir, tmp_path):
    code = grid_exit(grid_args(tiny_sdxl_dir, "--num_inference_steps", "1001", "--output", str(tmp_path / "g.png")))
    assert code == (
        "lily-grid: error: --num_inference_steps 1001 is more than the 1000 timesteps the base model's scheduler "
        "was trained with."
    )


@pytest.mark.parametrize(("extra", "message"), [
    (["--resolution", "9600"], "--resolution 9600 makes a grid of 1 x 1 images of 92,160,000 pixels in all, more "
                               "than PIL's decompression-bomb limit of 89,478,485 (Image.MAX_IMAGE_PIXELS)"),
    (["--cell_size", "7000", "--prompt", "b"], "--cell_size 7000 makes a grid of 2 x 1 images of 98,000,000 pixels"),
    (["--guidance_scale", "1e39"], "argument --guidance_scale: must be within float32's range (at most 3.403e+38), "
                                   "got '1e39'"),
])  # fmt: skip
def test_grids_past_the_pixel_limit_and_guidance_past_float32_are_usage_errors(tiny_sdxl_dir, capsys, extra, message):
    assert grid_exit(grid_args(tiny_sdxl_dir, *extra)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"lily-grid: error: {message}")


def test_one_image_within_the_pixel_limit_is_not_refused_by_it(tiny_sdxl_dir):
    from lily_diffusion.grids import parse_args as grid_parse_args

    assert grid_parse_args(grid_args(tiny_sdxl_dir, "--cell_size", "7000")).cell_size == 7000


# load_lily_weights(pipe, ..., component=...).


def test_component_selects_what_loads_into_a_pipeline(pipe, tiny_sdxl_dir, tmp_path):
    add_lily(pipe.unet, LilyConfig(r=4, stride_A=2, num_B=2))
    add_lily(pipe.text_encoder_2, LilyConfig(r=2, num_B=2, target_modules=list(TEXT_ENCODER_TARGET_MODULES)))
    path = save_lily_weights(tmp_path, unet=pipe.unet, text_encoder_2=pipe.text_encoder_2)
    target = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    with pytest.raises(ValueError, match=r"has no 'text_encoder' adapter; it has \['text_encoder_2', 'unet'\]"):
        load_lily_weights(target, path, component="text_encoder")
    assert lily_adapters(target.unet) == {} and lily_adapters(target.text_encoder_2) == {}
    load_lily_weights(target, path, component="text_encoder_2")
    assert lily_adapters(target.unet) == {} and list(lily_adapters(target.text_encoder_2)) == ["default"]
    with torch.no_grad():
        assert all(torch.isfinite(p).all() for p in target.text_encoder_2.parameters())
