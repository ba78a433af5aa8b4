"""`lily-inspect ADAPTER [--lora FILE] [--pipeline BASE] [--prompts ...] [--out DIR]`: what a Lily adapter learned.

Without `--pipeline`: weights-only statistics (expert norms, A and B spectra, LoRA spectra). With it: the adapter
is loaded into the base pipeline, a few denoising steps run on the prompts, and every Lily layer's router
weights are recorded to measure selectivity and the effective rank of its input-dependent update.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from ..lora_files import LORA_WEIGHT_NAME
from ..messages import one_line
from ..pipeline import check_lily_weights, components_of, load_lily_weights
from ..serialization import WEIGHTS_NAME
from .analysis import analyse_layers, expert_use, summarise
from .collect import collect_mixes
from .lora import LoraLayer, lora_layer_stats, read_lora_file
from .report import InspectionReport, format_table, write_json, write_plots
from .weights import lily_weight_stats

logger = logging.getLogger(__name__)

# The bundled toy subject's prompts (instance, two scenes, class); pass your own instance prompt for your adapter.
DEFAULT_PROMPTS = (
    "a photo of sks star",
    "a photo of sks star on a blue background",
    "a photo of sks star on a red background",
    "a photo of a star",
)
PIPELINE_ONLY = ("prompts", "num_inference_steps", "seed", "resolution")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, got {text!r}")
    return value


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument (exit status 2 with one line for a bad one); nothing is read."""
    parser = argparse.ArgumentParser(prog="lily-inspect", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="Lily weights file, or the folder holding pytorch_lily_weights.safetensors.")
    parser.add_argument("--lora", help="A LoRA file (or folder) of the same budget to compare effective ranks with.")
    parser.add_argument("--pipeline", help="Base pipeline (folder or hub id): measure on real prompts.")
    parser.add_argument("--prompts", nargs="+", help=f"Prompts (with --pipeline; default: {list(DEFAULT_PROMPTS)}).")
    parser.add_argument("--num_inference_steps", type=_positive_int, help="Denoising steps recorded (default 4).")
    parser.add_argument("--seed", type=_seed, help="Seed of the initial noise (default 0).")
    parser.add_argument("--resolution", type=_positive_int, help="Image size, a multiple of 8 (default: the model's).")
    parser.add_argument("--out", default="lily-inspect", help="Folder for report.json and the PNGs.")
    parser.add_argument("--no_plots", action="store_true", help="Write the table and JSON only (no matplotlib).")
    args = parser.parse_args(input_args)
    problem = _argument_problem(**{name: getattr(args, name) for name in (*PIPELINE_ONLY, *CHECKED)})
    if problem:
        parser.error(problem)
    return args


CHECKED = ("pipeline", "out", "no_plots")


def _argument_problem(
    pipeline: str | None,
    prompts: list[str] | None,
    num_inference_steps: int | None,
    seed: int | None,
    resolution: int | None,
    out: str,
    no_plots: bool,
) -> str | None:
    """The first argument lily-inspect cannot use, as a sentence, or None."""
    values = {"prompts": prompts, "num_inference_steps": num_inference_steps, "seed": seed, "resolution": resolution}
    if pipeline is None:
        given = [f"--{name}" for name in PIPELINE_ONLY if values[name] is not None]
        if given:
            return f"{', '.join(given)} given without --pipeline: they choose what runs through the pipeline"
    if prompts is not None and not all(p.strip() for p in prompts):
        return "--prompts must not be empty strings"
    if resolution is not None and resolution % 8:
        return f"--resolution must be a multiple of 8 (SDXL's VAE and UNet need it), got {resolution}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder"
    parent = next(p for p in out.absolute().parents if p.exists()) if not out.exists() else out
    if not parent.is_dir():
        return f"--out {out} is under {parent}, which is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write under {parent}"
    if not no_plots and importlib.util.find_spec("matplotlib") is None:
        return "the plots need matplotlib: pip install 'lily_diffusion[diagnostics]', or pass --no_plots"
    return None


def check_lora_fits(pipe: object, layers: dict[str, LoraLayer], source: str) -> None:
    """Every LoRA layer must name an `nn.Linear` of the pipeline with its shape (one-line `ValueError`)."""
    components = components_of(pipe)
    for key, layer in layers.items():
        component, _, path = key.partition(".")
        model = components.get(component)
        try:
            module = model.get_submodule(path) if model is not None else None
        except AttributeError:
            module = None
        shape = (layer.up.shape[0], layer.down.shape[1])
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != shape:
            raise ValueError(f"--lora {source} does not fit the base pipeline: no Linear {key} of shape {shape}.")


def load_pipeline(name: str) -> object:
    """`DiffusionPipeline.from_pretrained(name)` in fp32, with a one-line `ValueError`."""
    from diffusers import DiffusionPipeline

    path = Path(name).expanduser()
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(f"--pipeline {name} is not a diffusers pipeline folder (no model_index.json).")
    try:
        pipe = DiffusionPipeline.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the base pipeline {name}: {one_line(error, limit=600)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_folders(adapter: Path, lora: Path | None) -> None:
    """Name the swap when a folder holds the other kind of file than the one asked for."""
    if adapter.is_dir() and not (adapter / WEIGHTS_NAME).exists() and (adapter / LORA_WEIGHT_NAME).is_file():
        raise ValueError(f"{adapter} holds a LoRA ({LORA_WEIGHT_NAME}), not a Lily adapter: pass it with --lora.")
    if lora and lora.is_dir() and not (lora / LORA_WEIGHT_NAME).exists() and (lora / WEIGHTS_NAME).is_file():
        raise ValueError(f"--lora {lora} holds a Lily adapter ({WEIGHTS_NAME}): pass it as the ADAPTER argument.")


INSPECTION = ("adapter", "lora", "pipeline", "prompts", "num_inference_steps", "seed", "resolution")


def run_inspection(
    adapter: str,
    lora: str | None = None,
    pipeline: str | None = None,
    prompts: list[str] | None = None,
    num_inference_steps: int | None = None,
    seed: int | None = None,
    resolution: int | None = None,
) -> InspectionReport:
    """Check every input, then measure; raises a one-line `ValueError`/`FileNotFoundError` for a bad input."""
    _check_folders(Path(adapter), Path(lora) if lora else None)
    weights = lily_weight_stats(adapter)
    lora_file = read_lora_file(lora) if lora else {}
    pipe = None
    if pipeline:
        pipe = load_pipeline(pipeline)
        check_lily_weights(pipe, adapter)
        check_lora_fits(pipe, lora_file, lora)
    lora_layers = lora_layer_stats(lora_file)
    report = InspectionReport(str(adapter), lora, pipeline, weights, lora_layers, [], {})
    if pipe is not None:
        load_lily_weights(pipe, adapter)
        activations = collect_mixes(
            pipe,
            prompts or list(DEFAULT_PROMPTS),
            num_inference_steps=num_inference_steps or 4,
            seed=seed or 0,
            resolution=resolution,
        )
        report.layers = analyse_layers(pipe, activations, lora_layers)
        report.prompts, report.timesteps = activations.prompts, activations.timesteps
        report.heatmap = {
            key: mixes.mean(dim=1).tolist()
            for key, mixes in activations.mixes.items()
            if key.startswith("unet.") and mixes.shape[0] == len(activations.timesteps)
        }
    report.expert_use = expert_use(weights.pools, report.layers)
    report.summary = summarise(weights, report.layers, lora_layers, report.expert_use)
    return report


def main(input_args: Sequence[str] | None = None) -> int:
    """The `lily-inspect` console script: 0 on success; 2 for a bad argument, 1 for an unusable file or model."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(input_args)
    try:
        report = run_inspection(**{name: getattr(args, name) for name in INSPECTION})
    except (FileNotFoundError, ValueError, SafetensorError) as error:
        raise SystemExit(f"lily-inspect: error: {one_line(error, limit=2000)}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(format_table(report))
    write_json(report, out / "report.json")
    (out / "table.txt").write_text(format_table(report) + "\n")
    if not args.no_plots:
        write_plots(report, out)
    logger.info("Wrote %s and %s.", out / "report.json", out / "table.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
