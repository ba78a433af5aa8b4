"""Labelled comparison grids: one image per (prompt, seed, adapter), rows = prompt x seed, columns = adapters.

Works the same on the real SDXL pipeline and the bundled toy one. Each file's kind is found by the adapter
backends' `detect`: Lily files load with `load_lily_weights`, LoRA and DoRA files with diffusers'
`pipe.load_lora_weights`, LoKr and LoHa files with `load_lycoris_weights`; the base model is a column too.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .backends import BACKENDS
from .images import generate, labelled_grid
from .lora_files import LORA_WEIGHT_NAME
from .lycoris_files import WEIGHT_NAMES as LYCORIS_WEIGHT_NAMES
from .lycoris_files import LycorisFileError, load_lycoris_weights, unload_lycoris_weights
from .messages import one_line
from .patterns import shorten
from .pipeline import check_lily_weights, load_lily_weights, unload_lily_weights
from .serialization import COMPONENTS, WEIGHTS_NAME

logger = logging.getLogger(__name__)

GRID_ADAPTER_NAME = "grid"  # the name each adapter is loaded under while its column is generated
WEIGHT_FILE_NAMES = (WEIGHTS_NAME, LORA_WEIGHT_NAME, *LYCORIS_WEIGHT_NAMES.values())  # looked for in a folder
DIFFUSERS_KINDS = ("lora", "dora")  # loaded by diffusers' load_lora_weights
LYCORIS_KINDS = tuple(LYCORIS_WEIGHT_NAMES)  # loaded by load_lycoris_weights
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class GridAdapter:
    """One column of the grid: an adapter file (or None for the base model) and what it is."""

    name: str
    path: Path | None
    kind: str  # "base", or an adapter kind: "lily", "lora", "dora", "lokr", "loha"
    num_parameters: int

    @property
    def label(self) -> str:
        return self.name if self.kind == "base" else f"{self.name} ({self.kind}, {self.num_parameters:,} params)"


def describe_adapter(name: str, path_or_dir: str | os.PathLike[str]) -> GridAdapter:
    """Find the weights file, tell its kind (Lily, LoRA, DoRA, LoKr, LoHa) by the backends' `detect`, count its
    parameters.

    Only safetensors files are read (a pickle file can run code); `ValueError` or `FileNotFoundError`
    in one line for anything else.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        candidates = [path / name for name in WEIGHT_FILE_NAMES]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        pickles = sorted(p.name for p in Path(path_or_dir).glob("*.bin")) if Path(path_or_dir).is_dir() else []
        hint = f"; found {', '.join(pickles)}, but pickle files are not loaded (they can run code)" if pickles else ""
        raise FileNotFoundError(
            f"No adapter weights at {path_or_dir} (looked for {', '.join(WEIGHT_FILE_NAMES)}){hint}."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            count = sum(_numel(handle.get_slice(key).get_shape()) for key in keys if not key.endswith(".alpha"))
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({one_line(error)}); lily-grid reads only safetensors "
            "adapters (a truncated download, or a pickle .bin/.pt file, which is never loaded since it can run code)."
        ) from None
    kinds = [kind for kind, backend in BACKENDS.items() if backend.detect(metadata, keys)]
    if len(kinds) != 1:
        raise ValueError(f"{path} is neither a lily_diffusion file (Lily, LoKr, LoHa) nor a diffusers LoRA file.")
    if kinds[0] in DIFFUSERS_KINDS and path.suffix != ".safetensors":  # diffusers would look for a pickle file
        raise ValueError(f"{path} is a LoRA file without the .safetensors suffix diffusers needs; rename it.")
    return GridAdapter(name, path, kinds[0], count)


def check_adapter_fits(pipe: StableDiffusionXLPipeline, adapter: GridAdapter) -> None:
    """Check that `adapter` loads into `pipe` as it will for its column; the pipeline is left as it was.

    Lily files get every check of `load_lily_weights`; LoKr and LoHa files every check of `load_lycoris_weights`
    (they are loaded and unloaded again). LoRA and DoRA files are loaded by diffusers and unloaded again, and every
    weight in the file must have found a module of the pipeline.
    """
    where = f"adapter {adapter.name!r} ({adapter.path})"
    if adapter.kind == "lily":
        try:
            check_lily_weights(pipe, adapter.path)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"{where} does not fit the base model: {error}") from None
        return
    if adapter.kind in LYCORIS_KINDS:
        try:
            load_lycoris_weights(pipe, adapter.path, adapter_name=GRID_ADAPTER_NAME)
        except (FileNotFoundError, LycorisFileError) as error:
            raise ValueError(f"{where} does not fit the base model: {error}") from None
        finally:
            unload_lycoris_weights(pipe, GRID_ADAPTER_NAME)
        return
    if adapter.kind not in DIFFUSERS_KINDS:
        return
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)  # its page-long error log would repeat our one line
    try:
        _load_lora(pipe, adapter)
        loaded = _lora_parameter_count(pipe)
    except Exception as error:  # whatever diffusers or peft raise: this file cannot be used with this pipeline
        raise ValueError(
            f"{where} does not fit the base model: diffusers cannot load it ({type(error).__name__}: "
            f"{one_line(error)})."
        ) from None
    finally:
        pipe.unload_lora_weights()
        diffusers_logging.set_verbosity(verbosity)
    if loaded != adapter.num_parameters:
        raise ValueError(
            f"{where} does not fit the base model: only {loaded:,} of its {adapter.num_parameters:,} LoRA weights "
            "found a module of the pipeline (saved for another model?)."
        )


def _load_lora(pipe: StableDiffusionXLPipeline, adapter: GridAdapter) -> None:
    """diffusers' own LoRA loading, from the named safetensors file only."""
    pipe.load_lora_weights(str(adapter.path.parent), weight_name=adapter.path.name, adapter_name=GRID_ADAPTER_NAME)


def _lora_parameter_count(pipe: StableDiffusionXLPipeline) -> int:
    """Elements of the LoRA weights loaded under the grid's adapter name, over the adaptable components."""
    models = [getattr(pipe, name, None) for name in COMPONENTS]
    marker = f".{GRID_ADAPTER_NAME}."
    return sum(
        parameter.numel()
        for model in models
        if isinstance(model, nn.Module)
        for name, parameter in model.named_parameters()
        if "lora_" in name and marker in name
    )


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def generate_for_adapter(
    pipe: StableDiffusionXLPipeline,
    adapter: GridAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    size: int | None,
) -> list[Image.Image]:
    """Images for every (prompt, seed) in row order; one pipeline call per prompt with all seeds batched."""
    if adapter.kind == "lily":
        load_lily_weights(pipe, adapter.path, adapter_name=GRID_ADAPTER_NAME)
    elif adapter.kind in DIFFUSERS_KINDS:
        _load_lora(pipe, adapter)
    elif adapter.kind in LYCORIS_KINDS:
        load_lycoris_weights(pipe, adapter.path, adapter_name=GRID_ADAPTER_NAME)
    try:
        pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
        return generate(
            pipe,
            [prompt for prompt, _ in pairs],
            [seed for _, seed in pairs],
            num_inference_steps,
            guidance_scale,
            size,
            batch_size=len(seeds),  # one pipeline call per prompt
        )
    finally:
        if adapter.kind == "lily":
            unload_lily_weights(pipe, GRID_ADAPTER_NAME)
        elif adapter.kind in DIFFUSERS_KINDS:
            pipe.unload_lora_weights()
        elif adapter.kind in LYCORIS_KINDS:
            unload_lycoris_weights(pipe, GRID_ADAPTER_NAME)


def comparison_grid(
    pipe: StableDiffusionXLPipeline,
    adapters: Sequence[GridAdapter],
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    size: int | None = None,
    cell_size: int | None = None,
) -> Image.Image:
    """Generate every (prompt, seed, adapter) and lay them out with labels."""
    pipe.set_progress_bar_config(disable=True)
    columns = [
        generate_for_adapter(pipe, adapter, prompts, seeds, num_inference_steps, guidance_scale, size)
        for adapter in tqdm(adapters, desc="adapters")
    ]
    row_labels = [f"{prompt} (seed {seed})" for prompt in prompts for seed in seeds]
    return labelled_grid(columns, row_labels, [adapter.label for adapter in adapters], cell_size)


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument (exit status 2 with one line for a bad one); nothing is loaded."""
    parser = argparse.ArgumentParser(prog="lily-grid", description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="Base pipeline: hub id or folder.")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="An adapter file or folder (Lily, LoRA, DoRA, LoKr or LoHa; safetensors), repeatable.",
    )
    parser.add_argument("--no_base", action="store_true", help="Leave out the base model's column.")
    parser.add_argument("--prompt", action="append", required=True, help="A prompt (a row per seed), repeatable.")
    parser.add_argument("--seed", type=_seed, action="append", default=None, help="Seeds (default 0 and 1).")
    parser.add_argument("--num_inference_steps", type=_positive_int, default=25)
    parser.add_argument("--guidance_scale", type=_finite_float, default=5.0)
    parser.add_argument(
        "--resolution", type=_positive_int, default=None, help="Image size, a multiple of 8 (default: the model's)."
    )
    parser.add_argument(
        "--cell_size", type=_positive_int, default=None, help="Resize every image to this many pixels."
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="dtype the base pipeline is loaded in (torch_dtype)."
    )
    parser.add_argument("--variant", default=None, help="Weight files of this variant, e.g. fp16 (as diffusers).")
    parser.add_argument("--output", default="grid.png", help="Where to write the image (PNG, or another PIL format).")
    args = parser.parse_args(input_args)
    problem = _argument_problem(**{name: getattr(args, name) for name in ARGUMENTS_CHECKED})
    if problem:
        parser.error(problem)
    return args


ARGUMENTS_CHECKED = (
    "adapter",
    "no_base",
    "resolution",
    "cell_size",
    "prompt",
    "seed",
    "output",
    "pretrained_model_name_or_path",
)


def _argument_problem(
    adapter: list[str],
    no_base: bool,
    resolution: int | None,
    cell_size: int | None,
    prompt: list[str],
    seed: list[int] | None,
    output: str,
    pretrained_model_name_or_path: str,
) -> str | None:
    """The first argument lily-grid cannot use, as a sentence, or None."""
    names = []
    for spec in adapter:
        name, _, path = spec.partition("=")
        if not name or not path:
            return f"--adapter takes NAME=PATH with both parts non-empty, got {spec!r}"
        names.append(name)
    if len(set(names)) != len(names):
        return f"--adapter names must differ, got {names}"
    if no_base and not adapter:
        return "--no_base leaves no column to draw: give at least one --adapter"
    if resolution is not None and resolution % 8:
        return f"--resolution must be a multiple of 8 (SDXL's VAE and UNet need it), got {resolution}"
    return (
        _grid_size_problem(
            len(prompt) * len(seed or [0, 1]), len(adapter) + (0 if no_base else 1), resolution, cell_size
        )
        or _output_problem(Path(output))
        or _base_problem(pretrained_model_name_or_path)
    )


def _grid_size_problem(rows: int, columns: int, resolution: int | None, cell_size: int | None) -> str | None:
    """The grid (and each image) must stay within PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return None
    for flag, side in (("--resolution", resolution), ("--cell_size", cell_size)):
        if side is not None and rows * columns * side * side > limit:
            return (
                f"{flag} {side} makes a grid of {rows} x {columns} images of {rows * columns * side * side:,} pixels "
                f"in all, more than PIL's decompression-bomb limit of {limit:,} (Image.MAX_IMAGE_PIXELS)"
            )
    return None


def _output_problem(output: Path) -> str | None:
    if output.is_dir():
        return f"--output {output} is a folder; give a file name such as {output / 'grid.png'}"
    extensions = Image.registered_extensions()
    if extensions.get(output.suffix.lower()) not in Image.SAVE:
        return f"--output {output} has no image suffix PIL can write (such as .png or .jpg)"
    parent = next(p for p in output.absolute().parents if p.exists())
    if not parent.is_dir():
        return f"--output {output} is under {parent}, which is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--output {output}: cannot write under {parent}"
    return None


def _base_problem(name: str) -> str | None:
    """Local folders are checked here; anything else is left to from_pretrained as a Hub id."""
    path = Path(name).expanduser()
    if path.is_file():
        return f"--pretrained_model_name_or_path {name} is a file, not a pipeline folder"
    if path.is_dir() and not (path / "model_index.json").is_file():
        return f"--pretrained_model_name_or_path {name} has no model_index.json: not a diffusers pipeline folder"
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    if not path.exists() and looks_local:
        return f"--pretrained_model_name_or_path {name}: no such folder"
    return None


def _int_in(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (None: no upper bound), described as `what`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_in(1, None, "a positive integer")
_seed = _int_in(0, 2**64 - 1, "an integer from 0 to 2**64 - 1")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if abs(value) > FLOAT32_MAX:  # the pipeline computes in float32 or narrower: it would be infinite there
        raise argparse.ArgumentTypeError(f"must be within float32's range (at most {FLOAT32_MAX:.4g}), got {text!r}")
    return value


def load_base(name: str, dtype: torch.dtype, variant: str | None = None) -> StableDiffusionXLPipeline:
    """`StableDiffusionXLPipeline.from_pretrained(name, torch_dtype=dtype, variant=variant)`, with a one-line
    `ValueError`.

    diffusers and transformers raise OSError, ValueError, KeyError, TypeError or RuntimeError for a folder that
    is not a usable pipeline (a missing or corrupt file, a config with impossible sizes)."""
    try:
        return StableDiffusionXLPipeline.from_pretrained(name, torch_dtype=dtype, variant=variant)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"cannot load the base model {shorten(name)}: {one_line(error)}") from None


def check_loaded_base(pipe: StableDiffusionXLPipeline, num_inference_steps: int) -> None:
    """A one-line `ValueError` for a loaded base model that cannot generate as asked: a tokenizer longer than its
    text encoder (a tokenizer folder without its files loads as an empty tokenizer of unbounded length), or more
    denoising steps than the scheduler has training timesteps (the steps would repeat timesteps)."""
    for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
        if tokenizer is None or encoder is None:
            continue
        positions = encoder.config.max_position_embeddings
        if tokenizer.model_max_length > positions:
            raise ValueError(
                f"the base model's {tokenizer_name} takes {tokenizer.model_max_length:,} tokens but its "
                f"{encoder_name} only {positions} (are the {tokenizer_name} files missing?)."
            )
    timesteps = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if timesteps is not None and num_inference_steps > timesteps:
        raise ValueError(
            f"--num_inference_steps {num_inference_steps} is more than the {timesteps} timesteps the base model's "
            "scheduler was trained with."
        )


def main(input_args: Sequence[str] | None = None) -> int:
    """The `lily-grid` console script: 0 on success; 2 for a bad argument, 1 for an unusable file or model.

    Every adapter is read and checked against the loaded base model before any image is generated.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(input_args)
    try:
        adapters = [describe_adapter(*spec.split("=", 1)) for spec in args.adapter]
        pipe = load_base(args.pretrained_model_name_or_path, DTYPES[args.dtype], args.variant)
        check_loaded_base(pipe, args.num_inference_steps)
        for adapter in adapters:
            check_adapter_fits(pipe, adapter)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"lily-grid: error: {one_line(error, limit=2000)}") from None
    if not args.no_base:
        adapters.insert(0, GridAdapter("base", None, "base", 0))
    grid = comparison_grid(
        pipe,
        adapters,
        args.prompt,
        args.seed or [0, 1],
        args.num_inference_steps,
        args.guidance_scale,
        args.resolution,
        args.cell_size,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    logger.info("wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
