"""Fixtures of the training tests: the tiny SDXL pipeline saved to disk, image folders, and a CLI runner."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from accelerate import PartialState
from PIL import Image

from toyworld.tiny_sdxl import build_tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_dreambooth_lily.py"

CliRunner = Callable[..., subprocess.CompletedProcess]
MainRunner = Callable[[Sequence[object]], None]


@pytest.fixture(scope="session", autouse=True)
def _accelerate_state() -> None:
    """accelerate's logger needs an initialised state, even in a single test process."""
    PartialState(cpu=True)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL pipeline, saved with save_pretrained so training uses the real loading path."""
    path = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(path)
    return path


def subject_array(height: int, width: int, shift: int = 0) -> np.ndarray:
    """The 'subject': a red square on a blue background (a learnable signal), optionally shifted."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[...] = (30, 60, 200)
    top, left = height // 4 + shift, width // 4
    array[top : top + height // 2, left : left + width // 2] = (230, 30, 30)
    return array


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four plain RGB images of the subject."""
    folder = tmp_path_factory.mktemp("subject")
    for i in range(4):
        Image.fromarray(subject_array(24, 20, shift=i % 2)).save(folder / f"subject_{i}.png")
    return folder


@pytest.fixture(scope="session")
def odd_images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The subject in awkward files: RGBA, palette with transparency, L, CMYK JPEG, 16-bit PNG, an EXIF-rotated
    JPEG, plus a corrupt file and a notes file."""
    folder = tmp_path_factory.mktemp("odd_images")
    rgb = Image.fromarray(subject_array(24, 20))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((24, 20), 128, dtype=np.uint8)))
    rgba.save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png", transparency=0)
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rgb.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif.tobytes())
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (folder / "notes.md").write_text("not an image\n")
    return folder


@pytest.fixture(scope="session")
def captioned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three images: one captioned in metadata.jsonl, one by a .txt beside it, one without a caption."""
    folder = tmp_path_factory.mktemp("captioned")
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(subject_array(20, 20)).save(folder / name)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a photo of sks star"}) + "\n")
    (folder / "b.txt").write_text("a photo of sks circle\n")
    return folder


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty HF_HOME: no user accelerate config, no hub cache."""
    return tmp_path_factory.mktemp("hf_home")


def cli_environment(hf_home: Path) -> dict[str, str]:
    """The environment of a training run in the tests: one thread, offline, an empty HF_HOME."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="session")
def run_cli(hf_home: Path) -> CliRunner:
    """Run the training script as a user would: `accelerate launch` (CPU) or plain `python`."""

    def run(
        args: Sequence[str],
        num_processes: int = 1,
        launcher: str = "accelerate",
        timeout: int = 300,
        prefix: Sequence[str] = (),
    ) -> subprocess.CompletedProcess:
        env = cli_environment(hf_home)
        if launcher == "python":
            command = [sys.executable, str(SCRIPT)]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
            command += ["--num_processes", str(num_processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
            if num_processes == 1:  # --quiet: a failing run ends with our error line, not the launcher's traceback
                command += ["--cpu", "--quiet"]
            else:  # torchrun on CPU: accelerate picks MULTI_CPU with gloo
                command += ["--multi_gpu", "--main_process_port", "0"]
                env["ACCELERATE_USE_CPU"] = "true"
            command += [str(SCRIPT)]
        command = [*prefix, *command, *(str(a) for a in args)]  # prefix: e.g. prlimit or setpriv
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def run_main() -> MainRunner:
    """Run the training script's `main` in this process (its flags parsed as on the command line): seconds
    instead of a subprocess's import time; a failed run fails the test with the script's one-line error."""
    spec = importlib.util.spec_from_file_location("train_dreambooth_lily", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(args: Sequence[object]) -> None:
        try:
            script.main(script.parse_options([str(a) for a in args]))
        except SystemExit as exit_:
            pytest.fail(f"training failed: {exit_}")

    return run


@pytest.fixture
def base_args(tiny_sdxl_path: Path) -> list[str]:
    """Flags every end-to-end run shares: the tiny model at 16 px, fixed seed, no trackers."""
    return [
        "--pretrained_model_name_or_path", tiny_sdxl_path,
        "--resolution", "16",
        "--train_batch_size", "2",
        "--seed", "0",
        "--report_to", "none",
        "--checkpointing_steps", "1000",
        "--num_validation_inference_steps", "2",
    ]  # fmt: skip


@pytest.fixture
def lily_args() -> list[str]:
    """A small Lily (r=4, pairs of layers share A, two experts) so the tiny runs stay fast."""
    return ["--adapter", "lily", "--lily_r", "4", "--lily_stride_A", "2", "--lily_num_B", "2"]
