"""Bad inputs are refused with one line before any expensive work; flags that would do nothing are named.

Images of absurd size, unreadable folders and files, folders that cannot be written, captions that are not
UTF-8 text, and flag values the run could not use. The command-line tests pass a model path that does not
exist: a run that got as far as loading the model would end with that error instead of the expected one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lily_diffusion.backends import get_backend
from lily_diffusion.config import LilyConfig
from lily_diffusion.layer import LilyLinear
from lily_diffusion.training.adapters import AdaptedModels, add_adapters
from lily_diffusion.training.args import build_parser, ignored_flags, options_from_args, parse_args
from lily_diffusion.training.class_images import check_class_data_dir
from lily_diffusion.training.conditioning import truncation_warnings
from lily_diffusion.training.data import (
    MAX_ASPECT_RATIO,
    load_class_records,
    load_instance_records,
    read_captions,
    sidecar_caption,
)
from lily_diffusion.training.errors import TrainingError
from lily_diffusion.training.hub_dataset import row_image
from lily_diffusion.training.paths import check_writable_folder
from toyworld.tiny_sdxl import build_tiny_sdxl_pipeline, build_tokenizer

REQUIRED = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
DROP_FILE_POWERS = ["--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


def _image_folder(folder: Path, *sizes: tuple[int, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes or [(20, 20)]):
        Image.new("RGB", size, (200, 30, 30)).save(folder / f"img{i}.png")
    return folder


def _cli_args(tmp_path: Path, instance: Path, *extra: object) -> list[object]:
    return [
        "--pretrained_model_name_or_path", tmp_path / "no-model", "--instance_data_dir", instance,
        "--instance_prompt", "a photo of sks star", "--output_dir", tmp_path / "out", "--resolution", "16",
        "--report_to", "none", *extra,
    ]  # fmt: skip


def _last_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def _without_file_powers(tmp_path: Path) -> list[str]:
    """A command prefix under which permission bits bind the child as they bind any user.

    Root ignores them through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; `setpriv` drops both, and the child keeps
    uid 0, so it still runs the interpreter under /root (mode 0700, which would stop the user `nobody`)."""
    if os.geteuid() != 0:
        return []
    denied = tmp_path / "denied-probe"
    denied.write_text("x")
    denied.chmod(0)
    setpriv = shutil.which("setpriv")
    probe = ["sh", "-c", f"test -r '{denied}' || echo denied"]
    if (
        setpriv is None
        or subprocess.run([setpriv, *DROP_FILE_POWERS, "--", *probe], capture_output=True).stdout != b"denied\n"
    ):
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here: mode 000 would not stop the run")
    return [setpriv, *DROP_FILE_POWERS, "--"]


# Images of absurd size (checked from the header, before decoding).


def test_a_long_thin_image_is_refused_before_it_is_resized(run_cli, tmp_path):
    folder = _image_folder(tmp_path / "instance")
    Image.new("RGB", (100_000, 1), (200, 30, 30)).save(folder / "long.png")
    assert (folder / "long.png").stat().st_size < 1000  # a few hundred bytes; 314 GB once resized to 1024
    args = _cli_args(tmp_path, folder, "--resolution", "1024")
    limit = ["prlimit", "--as=6000000000"] if shutil.which("prlimit") else []  # a bug would fail, not swap
    result = run_cli(args, launcher="python", prefix=limit)
    assert result.returncode == 1
    expected = f"error: {folder / 'long.png'} is 100000x1 pixels, more than 16 times as long as it is wide; crop it"
    assert _last_error(result) == expected
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_pixel_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered to 1,000 pixels, so tiny files stand for huge ones."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


def test_pixel_count_limits_instance_and_class_images(tmp_path, small_pixel_limit):
    big = _image_folder(tmp_path / "big", (20, 20), (40, 40))  # 1,600 pixels: above the limit, PIL only warns
    with pytest.raises(TrainingError) as info:
        load_instance_records(big, "p", None, resolution=16)
    assert str(info.value) == (
        f"{big / 'img1.png'} has 40x40 = 1,600 pixels, more than PIL's decompression-bomb limit of 1,000 "
        "(Image.MAX_IMAGE_PIXELS); downscale it"
    )
    bomb = _image_folder(tmp_path / "bomb", (20, 20), (50, 50))  # 2,500 pixels: PIL's own error at open
    with pytest.raises(TrainingError) as info:
        load_class_records(bomb, "a star", 10, resolution=16)
    assert str(info.value) == (
        f"{bomb / 'img1.png'} has more than twice PIL's decompression-bomb limit of 1,000 pixels "
        "(Image.MAX_IMAGE_PIXELS); downscale it"
    )


def test_the_resized_size_is_bounded_too(tmp_path, small_pixel_limit):
    folder = _image_folder(tmp_path / "wide", (20, 10))  # 200 pixels
    assert len(load_instance_records(folder, "p", None, resolution=16)) == 1  # resized 32x16 = 512 pixels: fine
    with pytest.raises(TrainingError) as info:
        load_instance_records(folder, "p", None, resolution=24)
    assert str(info.value) == (
        f"{folder / 'img0.png'} (20x10) resized to --resolution 24 would have 1,152 pixels, more than PIL's "
        "decompression-bomb limit of 1,000"
    )


def test_aspect_ratio_limit_is_inclusive(tmp_path):
    folder = _image_folder(tmp_path / "ok", (MAX_ASPECT_RATIO * 2, 2))
    assert [r.size for r in load_instance_records(folder, "p", None, resolution=16)] == [(2, 32)]
    tall = _image_folder(tmp_path / "tall", (2, MAX_ASPECT_RATIO * 2 + 1))
    with pytest.raises(TrainingError, match=r"img0\.png is 2x33 pixels, more than 16 times as long as it is wide"):
        load_instance_records(tall, "p", None, resolution=16)


def test_dataset_images_are_checked_before_decoding(small_pixel_limit):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buffer, format="PNG")
    with pytest.raises(TrainingError) as info:
        row_image({"bytes": buffer.getvalue(), "path": "data/train/dog.png"}, "--dataset_name dogs, row 3", 16)
    assert str(info.value) == (
        "--dataset_name dogs, row 3 (dog.png) has 40x40 = 1,600 pixels, more than PIL's decompression-bomb limit "
        "of 1,000 (Image.MAX_IMAGE_PIXELS); downscale it"
    )
    with pytest.raises(TrainingError, match=r"^--dataset_name dogs, row 3 \(x\.png\): cannot read the image"):
        row_image({"bytes": b"\x89PNG\r\n\x1a\nnot an image", "path": "x.png"}, "--dataset_name dogs, row 3", 16)
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 10), (255, 0, 0, 255)).save(buffer, format="PNG")
    image = row_image({"bytes": buffer.getvalue(), "path": None}, "row 0", 16)
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (20, 10), (255, 0, 0))


def test_dataset_captions_must_be_text(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = _image_folder(tmp_path / "dogs", (20, 20), (20, 20))
    rows = [{"file_name": "img0.png", "caption": "sks dog"}, {"file_name": "img1.png", "caption": None}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "c"))["train"][1]["caption"] is None
    from lily_diffusion.training.hub_dataset import load_dataset_records

    with pytest.raises(TrainingError) as info:
        load_dataset_records(str(folder), None, str(tmp_path / "c"), "image", "caption", "p", 16)
    assert str(info.value) == f"--dataset_name {folder}, row 1: --caption_column 'caption' must hold text, got null"


# Folders that cannot be read or written.


def test_unreadable_instance_folder_is_one_line(run_cli, tmp_path):
    prefix = _without_file_powers(tmp_path)
    folder = _image_folder(tmp_path / "instance")
    folder.chmod(0)
    try:
        result = run_cli(_cli_args(tmp_path, folder), launcher="python", prefix=prefix)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 1
    assert _last_error(result) == f"error: --instance_data_dir {folder} cannot be read (Permission denied)"


def test_unreadable_caption_files_are_one_line(tmp_path):
    prefix = _without_file_powers(tmp_path)
    folder = _image_folder(tmp_path / "instance", (20, 20), (20, 20))
    (folder / "metadata.jsonl").write_text("")  # captions are read with --caption_column only
    (folder / "img0.txt").write_text("a photo of sks star\n")
    (folder / "img0.txt").chmod(0)
    (folder / "img1.png").chmod(0)
    code = (
        "from accelerate import PartialState\n"
        "PartialState(cpu=True)\n"
        "from lily_diffusion.training.data import load_instance_records\n"
        "from lily_diffusion.training.errors import TrainingError\n"
        "try:\n"
        f"    load_instance_records({str(folder)!r}, 'p', 'text', 16)\n"
        "except TrainingError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout == f"{folder / 'img0.txt'} cannot be read (Permission denied)\n"
    assert f"skipping unreadable instance file {folder / 'img1.png'}: [Errno 13] Permission denied" in result.stderr


def test_unwritable_class_folder_is_refused_before_generating(run_cli, tmp_path):
    prefix = _without_file_powers(tmp_path)
    instance = _image_folder(tmp_path / "instance")
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    args = _cli_args(tmp_path, instance, "--with_prior_preservation", "--class_prompt", "a photo of a star")
    result = run_cli([*args, "--class_data_dir", parent / "class"], launcher="python", prefix=prefix)
    assert result.returncode == 1
    expected = f"error: --class_data_dir {parent / 'class'} is not writable (Permission denied)"
    assert _last_error(result) == expected
    assert list(parent.iterdir()) == []


def test_output_dir_that_is_a_file_is_refused_first(run_cli, tmp_path):
    instance = _image_folder(tmp_path / "instance")
    (tmp_path / "out").write_text("a file\n")
    result = run_cli(_cli_args(tmp_path, instance), launcher="python")
    assert result.returncode == 1
    assert _last_error(result) == f"error: --output_dir {tmp_path / 'out'} is a file, not a folder"
    assert (tmp_path / "out").read_text() == "a file\n"


def test_writable_folder_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError) as info:
        check_writable_folder(tmp_path / "file" / "out", "--output_dir")
    assert (
        str(info.value)
        == f"--output_dir {tmp_path / 'file' / 'out'} is under a file ({tmp_path / 'file'}), not a folder"
    )
    check_writable_folder(tmp_path / "new" / "deeper", "--output_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe leaves nothing behind
    with pytest.raises(TrainingError, match=r"--class_data_dir .*file/class is under a file"):
        check_class_data_dir(tmp_path / "file" / "class", 3)
    full = _image_folder(tmp_path / "full", (8, 8), (8, 8))
    check_class_data_dir(full, 2)  # enough images: only read, never written


# Captions: UTF-8 text only, strings only.


def test_bad_utf8_names_the_file_and_line(tmp_path):
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_bytes(b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "caf\xe9"}\n')
    with pytest.raises(TrainingError) as info:
        read_captions(tmp_path, None)
    assert str(info.value) == f"{metadata}, line 2: not valid UTF-8 (byte 0xe9 at column 36); save it as UTF-8"
    caption = tmp_path / "c.txt"
    caption.write_bytes(b"a photo\nof sks \xff star\n")
    with pytest.raises(TrainingError) as info:
        sidecar_caption(tmp_path / "c.png")
    assert str(info.value) == f"{caption}, line 2: not valid UTF-8 (byte 0xff at column 8); save it as UTF-8"
    caption.write_bytes("\ufeffa photo of sks star\n".encode())  # a BOM is not part of the caption
    assert sidecar_caption(tmp_path / "c.png") == "a photo of sks star"


@pytest.mark.parametrize(
    ("value", "described"),
    [(None, "null"), ({"a": 1}, "an object"), (["x"], "a list"), (12, "the number 12"), (True, "a boolean")],
)
def test_caption_values_must_be_strings(tmp_path, value, described):
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(
        json.dumps({"file_name": "a.png", "text": "ok"})
        + "\n"
        + json.dumps({"file_name": "b.png", "text": value})
        + "\n"
    )
    with pytest.raises(TrainingError) as info:
        read_captions(tmp_path, None)
    assert str(info.value) == f"{metadata}, line 2: caption 'text' must be a string, got {described}"
    metadata.write_text(json.dumps({"file_name": 7, "text": "x"}) + "\n")
    with pytest.raises(TrainingError, match="line 1: 'file_name' must be a file name, got the number 7"):
        read_captions(tmp_path, None)


def test_bad_caption_file_stops_the_cli(run_cli, tmp_path):
    folder = _image_folder(tmp_path / "instance")
    (folder / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": null}\n')
    result = run_cli(_cli_args(tmp_path, folder, "--caption_column", "text"), launcher="python")
    assert result.returncode == 1
    expected = f"error: {folder / 'metadata.jsonl'}, line 1: caption 'text' must be a string, got null"
    assert _last_error(result) == expected


# Flags: one line at argument check.


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--learning_rate", "-1e-4"], "--learning_rate must be a finite non-negative number, got -0.0001"),
        (["--learning_rate", "-inf"], "--learning_rate must be a finite non-negative number, got -inf"),
        (["--text_encoder_lr", "nan"], "--text_encoder_lr must be a finite non-negative number, got nan"),
        (
            ["--learning_rate", "1e39"],
            "--learning_rate 1e+39 is too large: the trained parameters are float32, whose largest value is 3.403e+38",
        ),
        (["--lily_scaling", "-1E+40"], "--lily_scaling -1e+40 is too large"),
        (["--resolution", "30"], "--resolution must be a multiple of 8 (SDXL's VAE downsamples by 8), got 30"),
        (
            [
                "--with_prior_preservation",
                "--class_data_dir",
                "c",
                "--class_prompt",
                "a star",
                "--num_class_images",
                "0",
            ],
            "--with_prior_preservation needs --num_class_images of at least 1, got 0",
        ),
        (
            ["--with_prior_preservation", "--class_data_dir", "d/", "--class_prompt", "a star"],
            "--class_data_dir must not be --instance_data_dir (class images would become instance images)",
        ),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
        (["--adam_beta2", "1.0"], "--adam_beta2 must be in [0, 1), got 1.0"),
        (["--adam_weight_decay", "-0.1"], "--adam_weight_decay must be a finite non-negative number, got -0.1"),
        (["--snr_gamma", "0"], "--snr_gamma must be a finite positive number, got 0.0"),
        (["--lora_alpha", "0", "--adapter", "lora"], "--lora_alpha must be at least 1, got 0"),
        (["--lr_num_cycles", "0"], "--lr_num_cycles must be at least 1, got 0"),
        (["--lr_warmup_steps", "-5"], "--lr_warmup_steps cannot be negative, got -5"),
        (["--lr_scheduler", "piecewise_constant"], "--lr_scheduler piecewise_constant needs --lr_step_rules, e.g."),
        (
            ["--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:10,fast"],
            "--lr_step_rules must look like '1:100,0.1:200,0.01' (multiplier:step pairs, then the final multiplier)",
        ),
        (["--lr_step_rules", "1:10,1:10,0.1"], "--lr_step_rules steps must be distinct positive whole numbers"),
        (["--lr_step_rules", "nan:10,0.1"], "--lr_step_rules multipliers must be finite and non-negative"),
        (
            ["--rank", "8", "--lora_dropout", "0.1"],
            "--rank, --lora_dropout are LoRA settings with no Lily equivalent: size Lily with --lily_r (or "
            "--match_lora_budget RANK",
        ),
        (["--lora_alpha", "8"], "--lora_alpha is a LoRA setting with no Lily equivalent"),
        (["--target_modules", "to_q", "attn1.*"], "--target_modules: 'attn1.*' is a regex, which must be the only"),
        (["--target_modules", "to_(q"], "--target_modules 'to_(q' is not a valid regex: missing ), unterminated"),
    ],
)
def test_bad_values_give_one_line(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*REQUIRED, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"train_dreambooth_lily.py: error: {message}"), err


def test_negative_numbers_in_any_notation_are_values():
    args = parse_args([*REQUIRED, "--lily_scaling", "-2.5e-1", "--learning_rate=1e-5"])
    assert args.lily_scaling == -0.25 and args.learning_rate == 1e-5


def test_target_modules_are_suffixes_or_one_regex():
    suffixes = parse_args([*REQUIRED, "--target_modules", "to_q", "to_out.0"])
    one_suffix = parse_args([*REQUIRED, "--target_modules", "to_q"])
    regex = parse_args([*REQUIRED, "--target_modules", r".*attn1\.to_(q|v)"])
    assert suffixes.target_modules == ["to_q", "to_out.0"] and one_suffix.target_modules == ["to_q"]
    assert regex.target_modules == r".*attn1\.to_(q|v)"

    def adapted(args, kind):
        unet = build_tiny_sdxl_pipeline(seed=0).unet
        add_adapters(get_backend(args.adapter), options_from_args(args).adapter, AdaptedModels(unet=unet), False)
        is_adapted = (lambda m: isinstance(m, LilyLinear)) if kind == "lily" else (lambda m: hasattr(m, "lora_A"))
        return {
            name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
            for name, m in unet.named_modules()
            if is_adapted(m)
        }

    small = ["--lily_r", "2", "--lily_stride_A", "2", "--lily_num_B", "2"]
    regex_lily = parse_args([*REQUIRED, *small, "--target_modules", r".*attn1\.to_(q|v)"])
    suffix_lily = parse_args([*REQUIRED, *small, "--target_modules", "to_q"])
    regex_lora = parse_args([*REQUIRED, "--adapter", "lora", "--target_modules", r".*attn2\.to_k"])
    assert adapted(regex_lily, "lily") == {"attn1.to_q", "attn1.to_v"}
    assert adapted(suffix_lily, "lily") == {"attn1.to_q", "attn2.to_q"}
    assert adapted(regex_lora, "lora") == {"attn2.to_k"}


def _help_entries(text: str) -> dict[str, str]:
    """Each option's entry in --help output (flag -> its lines joined), from the indented option lines."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_help_shows_every_default():
    parser = build_parser()
    entries = _help_entries(parser.format_help())
    defaults = LilyConfig()
    assert entries["--lily_r"] == f"--lily_r LILY_R Lily rank r. (default: {defaults.r})"
    assert entries["--lily_num_B"].endswith(f"(default: {defaults.num_B})")
    assert entries["--lily_stride_A"].endswith(f"(default: {defaults.stride_A})")
    assert entries["--target_modules"].endswith(f"(default: {' '.join(defaults.target_modules)})")
    assert entries["--adam_beta1"] == "--adam_beta1 ADAM_BETA1 beta1 of AdamW and Prodigy. (default: 0.9)"
    flags = {max(a.option_strings, key=len) for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags <= set(entries)
    assert [f for f in sorted(flags) if "default" not in entries[f] and "required" not in entries[f]] == []


# Warnings: a flag that does nothing, a prompt the tokenizer cuts.


def test_flags_that_do_nothing_are_named():
    args = parse_args([
        *REQUIRED, "--validation_steps", "5", "--class_prompt", "a star", "--class_data_dir", "c",
        "--lr_warmup_steps", "10", "--lr_step_rules", "1:5,0.1", "--hub_token", "hf_x",
        "--num_train_epochs", "3", "--max_train_steps", "9",
    ])  # fmt: skip
    assert ignored_flags(options_from_args(args)) == [
        "--validation_steps is ignored without --validation_prompt",
        "--class_data_dir is ignored without --with_prior_preservation",
        "--class_prompt is ignored without --with_prior_preservation",
        "--lr_warmup_steps is ignored with --lr_scheduler constant (use constant_with_warmup)",
        "--lr_step_rules is ignored without --lr_scheduler piecewise_constant",
        "--hub_token is ignored without --push_to_hub",
        "--num_train_epochs is ignored with --max_train_steps",
    ]
    both = parse_args([*REQUIRED, "--validation_prompt", "x", "--validation_steps", "5", "--validation_epochs", "2"])
    assert ignored_flags(options_from_args(both)) == ["--validation_epochs is ignored with --validation_steps"]
    lora = parse_args([*REQUIRED, "--adapter", "lora", "--lily_r", "8"])
    assert ignored_flags(options_from_args(lora)) == ["--lily_r is ignored with --adapter lora"]
    assert ignored_flags(options_from_args(parse_args(REQUIRED))) == []


def test_prompts_longer_than_the_tokenizer_are_named_once():
    tokenizer = build_tokenizer()  # model_max_length 16, as the tiny pipelines
    long = "a photo of sks star " * 5  # 25 words + 2 special tokens
    warnings = truncation_warnings(
        [tokenizer, tokenizer],
        {"--instance_prompt": [long], "captions": [long, long + "red", "a photo"], "--class_prompt": ["a star"]},
    )
    assert warnings == [
        "--instance_prompt is longer than the 16 tokens the text encoders take and truncated; "
        "this part is ignored: 'star a photo of sks star a photo of sks star'",
        f"2 captions are longer than the 16 tokens the text encoders take and truncated (first: {long[:60]!r}...); "
        "this part is ignored: 'star a photo of sks star a photo of sks star'",
    ]


def test_cli_warns_about_ignored_flags_and_long_prompts(run_cli, base_args, tmp_path):
    instance = _image_folder(tmp_path / "instance")
    long = "a photo of sks star " * 5
    args = [*base_args, "--instance_data_dir", instance, "--instance_prompt", long, "--output_dir", tmp_path / "out",
            "--max_train_steps", "1", "--lily_r", "2", "--lily_stride_A", "2", "--lily_num_B", "2",
            "--validation_steps", "1", "--class_prompt", "a photo of a star"]  # fmt: skip
    result = run_cli(args, launcher="python")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    warnings = [line.split(" - ", 3)[-1].removeprefix("[RANK 0] ") for line in lines if " - WARNING - " in line]
    assert warnings == [
        "--validation_steps is ignored without --validation_prompt",
        "--num_validation_inference_steps is ignored without --validation_prompt",  # from base_args
        "--class_prompt is ignored without --with_prior_preservation",
        "--instance_prompt is longer than the 16 tokens the text encoders take and truncated; "
        "this part is ignored: 'star a photo of sks star a photo of sks star'",
    ]
    assert (tmp_path / "out" / "pytorch_lily_weights.safetensors").is_file()


def test_checks_before_work_come_from_the_flags_alone(tmp_path):
    from lily_diffusion.training.trainer import check_before_work

    (tmp_path / "file").write_text("x")
    flags = [*REQUIRED, "--output_dir", tmp_path / "out"]
    with pytest.raises(TrainingError, match=r"^invalid Lily settings: LilyConfig\.num_B must be an integer >= 2"):
        check_before_work(options_from_args(parse_args([str(f) for f in [*flags, "--lily_num_B", "1"]])))
    prior = [*flags, "--with_prior_preservation", "--class_prompt", "a star", "--class_data_dir", tmp_path / "file"]
    with pytest.raises(TrainingError) as info:
        check_before_work(options_from_args(parse_args([str(f) for f in prior])))
    assert str(info.value) == f"--class_data_dir {tmp_path / 'file'} is a file, not a folder"
    check_before_work(options_from_args(parse_args([str(f) for f in flags])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created yet
