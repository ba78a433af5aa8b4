"""One step of a stress case, inside its own process: faults set up, output captured, the target run as a user runs it.

A step runs in a child forked from the warm runner (everything already imported, so a step costs only its own work)
or, with `fresh`, in a new interpreter: `python -m scripts.stress_child SPEC.json`. The targets:

- `train`: `train_dreambooth_lily.py ARGS`, run as `__main__` (what `python train_dreambooth_lily.py` does);
- `grid`: `python -m lily_diffusion.grids ARGS`;
- `load`: `load_lily_weights(pipe, PATH, **kwargs)` on the bundled toy pipeline; a ValueError or FileNotFoundError
  is the loader's documented refusal (printed as `error: ...`, exit 1), and the pipeline must then be unchanged;
- `call`: a named function of this module (e.g. the README's plain `from_pretrained` then `pipe(prompt)`).

Faults: `kill_on` (SIGKILL this process when an audit event such as `os.rename` touches a path matching a regex:
a kill at an exact moment of a save), `max_file_bytes` (writes past it fail as on a full disk), `umask`.
An exception that escapes the target prints its traceback and exits 1, as Python does.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import resource
import runpy
import signal
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toyworld.paths import BASE_MODEL_DIR, TRAIN_SCRIPT

LOADER_REFUSALS = (ValueError, FileNotFoundError)
MEMORY_LIMIT_BYTES = 6 << 30  # address space of one step: a memory bomb fails here instead of on the shared machine
_PIPELINE: Any = None  # the toy pipeline, loaded once by `preload` before the runner forks


@dataclass(frozen=True)
class ChildSpec:
    """Everything a step's process needs, JSON-serialisable (a fresh interpreter reads it from a file)."""

    target: str  # "train", "grid", "load" or "call"
    args: list[str]  # command-line arguments (train, grid), or [path] (load), or [function name] (call)
    stdout: str
    stderr: str
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)  # load: keyword arguments of load_lily_weights
    kill_on: list[str] | None = None  # [audit event, path regex]
    max_file_bytes: int | None = None
    umask: int | None = None
    no_file_powers: bool = False  # as root: drop the capabilities that ignore permission bits


def preload() -> None:
    """Import what the targets import and load the toy pipeline once, so that forked steps start warm."""
    global _PIPELINE
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    import lily_diffusion.grids
    import lily_diffusion.training  # noqa: F401

    torch.set_num_threads(1)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        _PIPELINE = StableDiffusionXLPipeline.from_pretrained(str(BASE_MODEL_DIR))
    finally:  # the steps forked from here print what a fresh process prints
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    _PIPELINE.set_progress_bar_config(disable=True)


def _redirect(spec: ChildSpec) -> None:
    """Point file descriptors 1 and 2 at the step's log files, and Python's logging back to a fresh state."""
    for fd, path in ((1, spec.stdout), (2, spec.stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


CAPABILITY_VERSION_3 = 0x20080522
FILE_POWERS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


def drop_file_powers() -> None:
    """As root, give up the capabilities that ignore permission bits (what `setpriv` does), so that a folder of
    mode 000 stops this process as it stops any user. Raises OSError if the kernel refuses."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for field_name in ("effective", "permitted", "inheritable"):
        setattr(data[0], field_name, getattr(data[0], field_name) & ~FILE_POWERS)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _install_faults(spec: ChildSpec) -> None:
    if spec.no_file_powers:
        drop_file_powers()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    if spec.max_file_bytes is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec.max_file_bytes, spec.max_file_bytes))
    if spec.umask is not None:
        os.umask(spec.umask)
    if spec.kill_on:
        event, pattern = spec.kill_on
        wanted = re.compile(pattern)

        def hook(name: str, args: tuple[Any, ...]) -> None:
            if name == event and args and wanted.search(str(args[0])):
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)


def _exit_code(error: SystemExit) -> int:
    """What the interpreter does with a SystemExit: None is 0, an int is itself, anything else is printed, 1."""
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


def run_target(spec: ChildSpec) -> int:
    """Run the step's target in this process and return its exit status."""
    if spec.target == "train":
        sys.argv = [str(TRAIN_SCRIPT), *spec.args]
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
        return 0
    if spec.target == "grid":
        sys.argv = ["lily_diffusion/grids.py", *spec.args]
        with warnings.catch_warnings():  # runpy: "found in sys.modules" (the warm runner imported it)
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module("lily_diffusion.grids", run_name="__main__", alter_sys=True)
        return 0
    if spec.target == "load":
        return load_into_toy(spec.args[0], spec.kwargs)
    if spec.target == "call":
        return CALLS[spec.args[0]]()
    raise ValueError(f"unknown target {spec.target!r}")


def child_main(spec: ChildSpec) -> int:
    """The whole life of a step's process after the fork (or exec): set up, run, report the exit status."""
    os.chdir(spec.cwd)
    os.environ.update(spec.env)
    _redirect(spec)
    _install_faults(spec)
    try:
        code = run_target(spec)
    except SystemExit as error:
        code = _exit_code(error)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


# Targets other than the two command-line programs.


def _pipeline() -> Any:
    global _PIPELINE
    if _PIPELINE is None:  # a fresh interpreter
        preload()
    return _PIPELINE


def _fingerprint(pipe: Any) -> tuple[tuple[str, tuple[int, ...], float], ...]:
    """Names, shapes and sums of every parameter and buffer of the adaptable components."""
    import torch

    rows = []
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                rows.append((f"{component}.{name}", tuple(tensor.shape), float(tensor.double().sum())))
    return tuple(rows)


def load_into_toy(path: str, kwargs: dict[str, Any]) -> int:
    """`load_lily_weights(toy_pipe, path, **kwargs)`; then either an image (finite) or an unchanged pipeline."""
    import numpy as np

    from lily_diffusion import load_lily_weights

    pipe = _pipeline()
    before = _fingerprint(pipe)
    kwargs = {key: _decode_number(value) for key, value in kwargs.items()}
    try:
        load_lily_weights(pipe, path, **kwargs)
    except LOADER_REFUSALS as error:
        print(f"error: {error}", file=sys.stderr)
        if _fingerprint(pipe) != before:
            print("the refused load changed the pipeline", file=sys.stderr)
            return 3
        return 1
    image = pipe("a photo of sks star", num_inference_steps=2, height=32, width=32, output_type="np").images
    if not np.isfinite(image).all():
        print("the loaded adapter gives non-finite images", file=sys.stderr)
        return 4
    print("loaded; image finite")
    return 0


def _decode_number(value: Any) -> Any:
    """JSON has no NaN or infinity literals that survive every writer: 'nan'/'inf' strings stand for them."""
    if isinstance(value, dict) and "float" in value:
        return float(value["float"])
    return value


def plain_from_pretrained() -> int:
    """What every diffusers user does with a model folder: `from_pretrained(folder)` then `pipe(prompt)`."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(BASE_MODEL_DIR))
    images = pipe("a photo of a star", num_inference_steps=2, output_type="np").images
    if not np.isfinite(images).all() or images.shape[1] < 8:
        print(f"bad image: shape {images.shape}", file=sys.stderr)
        return 4
    print(f"image {images.shape}, finite")
    return 0


def save_tiny_sdxl() -> int:
    """Save an SDXL pipeline of other widths than the toy base to ./out (adapters of the toy base do not fit it)."""
    from toyworld.tiny_sdxl import build_tiny_sdxl_pipeline

    build_tiny_sdxl_pipeline(seed=0).save_pretrained("out")
    return 0


CALLS = {"plain_from_pretrained": plain_from_pretrained, "save_tiny_sdxl": save_tiny_sdxl}


def spec_to_json(spec: ChildSpec) -> str:
    return json.dumps(asdict(spec))


def main(argv: list[str] | None = None) -> int:
    """`python -m scripts.stress_child SPEC.json`: one step in a fresh interpreter."""
    argv = sys.argv[1:] if argv is None else argv
    spec = ChildSpec(**json.loads(Path(argv[0]).read_text()))
    return child_main(spec)


if __name__ == "__main__":
    sys.exit(main())
