"""Speed, memory and file size of our Lily against peft's LoRA and peft's Lily, measured side by side.

    python -m benchmarks.speed                  # CPU: SDXL UNet architecture at reduced width, 32x32 latents
    python -m benchmarks.speed --full-sdxl      # the exact SDXL UNet config (random weights), 64x64 latents
    python -m benchmarks.speed --full-sdxl --device cuda --dtype fp16   # 128x128 latents, gradient checkpointing

One process and one base UNet: every contender gets a weight-sharing copy of it, and the contenders
run interleaved (A B C A B C ...), warm-up excluded, so that the ratios are fair on a noisy machine.
On CPU the peak memory of a training step is the peak RSS of a child process per contender.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from toyworld.sdxl_config import SDXL_BASE_UNET_CONFIG

from .contenders import AdapterSpec, Prepared, prepare, registry
from .report import Results, iter_tables, machine_description, markdown, marked_section, versions

logger = logging.getLogger("speed")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TEXT_TOKENS = 77
FIGURES = ("train", "inference", "memory", "size")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Inputs = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    dtype: str = "fp32"
    full_sdxl: bool = False
    latent: int = 32
    train_batch: int = 2
    cfg_batch: int = 2
    repeats: int = 7
    warmup: int = 2
    gradient_checkpointing: bool = False
    figures: tuple[str, ...] = FIGURES
    contenders: tuple[str, ...] | None = None  # None: all
    spec: AdapterSpec = field(default_factory=AdapterSpec)
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# ---------------------------------------------------------------- model and inputs


def unet_config(full_sdxl: bool) -> dict[str, Any]:
    """The SDXL UNet config; reduced width (64, 128, 256) unless `full_sdxl` (depths and dims kept)."""
    config = dict(SDXL_BASE_UNET_CONFIG)
    if not full_sdxl:
        config.update(block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4], sample_size=32)
    return config


def build_unet(settings: Settings) -> UNet2DConditionModel:
    """The base UNet (random weights, seeded), frozen, on the device in the base dtype."""
    torch.manual_seed(settings.seed)
    unet = UNet2DConditionModel(**unet_config(settings.full_sdxl))
    unet.requires_grad_(False)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(settings.device)
    return unet if settings.dtype == "fp32" else unet.to(settings.torch_dtype)


def unet_inputs(unet: UNet2DConditionModel, batch: int, settings: Settings, seed: int) -> Inputs:
    """SDXL-style inputs: latents, timesteps, 77 text tokens, pooled text embeds and time ids."""
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    pixels = float(8 * settings.latent)
    tensors = {
        "sample": torch.randn(batch, config.in_channels, settings.latent, settings.latent, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, generator=generator),
        "text_embeds": torch.randn(batch, text_dim, generator=generator),
        "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * batch),
    }
    moved = {key: value.to(settings.device, settings.torch_dtype) for key, value in tensors.items()}
    return {
        "sample": moved["sample"],
        "timestep": torch.randint(0, 1000, (batch,), generator=generator).to(settings.device),
        "encoder_hidden_states": moved["encoder_hidden_states"],
        "added_cond_kwargs": {"text_embeds": moved["text_embeds"], "time_ids": moved["time_ids"]},
    }


def autocast(settings: Settings) -> AbstractContextManager[Any]:
    """Mixed precision as the training scripts run it (fp32 adapters, half-precision base)."""
    if settings.dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(settings.device).type, dtype=settings.torch_dtype)


def synchronize(settings: Settings) -> None:
    if torch.device(settings.device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- the measured work


class TrainingStep:
    """Forward + MSE loss + backward + AdamW step. Without trainable weights the input takes the gradient."""

    def __init__(self, prepared: Prepared, inputs: Inputs, settings: Settings) -> None:
        self.prepared, self.settings = prepared, settings
        self.optimizer = torch.optim.AdamW(prepared.trainable, lr=1e-4) if prepared.trainable else None
        self.sample = inputs["sample"].detach().clone().requires_grad_(self.optimizer is None)
        self.kwargs = {**inputs, "sample": self.sample}
        generator = torch.Generator().manual_seed(1)
        self.target = torch.randn(self.sample.shape, generator=generator).to(self.sample.device)

    def __call__(self) -> None:
        if self.optimizer is None:
            self.sample.grad = None
        else:
            self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.settings):
            prediction = self.prepared.model(**self.kwargs).sample
        F.mse_loss(prediction.float(), self.target).backward()
        if self.optimizer is not None:
            self.optimizer.step()

    def layers_without_gradient(self) -> list[str]:
        """Adapted layers whose own parameter got no (or an all-zero) gradient in the last step."""
        if not self.prepared.per_layer:
            grad = self.sample.grad
            return [] if grad is not None and bool(grad.abs().sum() > 0) else ["<input>"]
        return [
            name
            for name, parameter in self.prepared.per_layer.items()
            if parameter.grad is None or not bool(parameter.grad.abs().sum() > 0)
        ]


def inference_forward(prepared: Prepared, inputs: Inputs, settings: Settings) -> Callable[[], None]:
    """One UNet forward on a CFG batch, without gradients."""

    def forward() -> None:
        with torch.no_grad(), autocast(settings):
            prepared.model(**inputs)

    return forward


@dataclass(frozen=True)
class Timing:
    """Median wall-clock and process-CPU seconds of one task."""

    wall_s: float
    cpu_s: float


def interleaved_medians(
    tasks: dict[str, Callable[[], None]], repeats: int, warmup: int, settings: Settings
) -> dict[str, Timing]:
    """Median seconds per task, running the tasks A B C A B C ...; the first `warmup` rounds are dropped.

    The process CPU time is kept too: on a machine shared with other jobs it is far less noisy
    than the wall clock (it does not count the time this process waits for a core).
    """
    wall: dict[str, list[float]] = {key: [] for key in tasks}
    cpu: dict[str, list[float]] = {key: [] for key in tasks}
    for round_index in range(warmup + repeats):
        for key, task in tasks.items():
            synchronize(settings)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            task()
            synchronize(settings)
            if round_index >= warmup:
                wall[key].append(time.perf_counter() - start_wall)
                cpu[key].append(time.process_time() - start_cpu)
        logger.info("round %d/%d done", round_index + 1, warmup + repeats)
    return {key: Timing(statistics.median(wall[key]), statistics.median(cpu[key])) for key in tasks}


def file_bytes(prepared: Prepared) -> int | None:
    """Size of the adapter file the contender's usual save path writes."""
    if prepared.save is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        return prepared.save(Path(directory)).stat().st_size


# ---------------------------------------------------------------- peak memory


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def memory_child(settings: Settings, key: str) -> dict[str, int]:
    """In a fresh process: the peak RSS over two training steps of one contender."""
    unet = build_unet(settings)
    prepared = prepare(unet, settings.spec, key, registry(unet, settings.spec)[key], settings.torch_dtype)
    step = TrainingStep(prepared, unet_inputs(unet, settings.train_batch, settings, settings.seed), settings)
    before = current_rss_bytes()
    reset_peak_rss()
    step()  # the first step also creates AdamW's state
    step()
    return {"peak_bytes": peak_rss_bytes(), "resident_before_bytes": before}


def measure_memory_cpu(argv: list[str], keys: list[str]) -> dict[str, dict[str, int]]:
    """Run `memory_child` once per contender, one child process at a time."""
    results = {}
    for key in keys:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-child", key]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child for {key} failed:\n{done.stderr[-3000:]}")
        results[key] = json.loads(done.stdout.strip().splitlines()[-1])
        logger.info("memory %s: %s", key, results[key])
    return results


def measure_memory_cuda(steps: dict[str, TrainingStep]) -> dict[str, dict[str, int]]:
    results = {}
    for key, step in steps.items():
        step()  # AdamW's state exists before the measured step
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        results[key] = {"peak_bytes": torch.cuda.max_memory_allocated(), "resident_before_bytes": before}
    return results


# ---------------------------------------------------------------- tables and results


def run_facts(settings: Settings, command: str, wall_s: float) -> list[str]:
    config = unet_config(settings.full_sdxl)
    return [
        f"command: `{command}`",
        f"machine: {machine_description(settings.device)}",
        f"versions: {versions()}",
        f"model: block_out_channels {config['block_out_channels']}, transformer depth "
        f"{config['transformer_layers_per_block']}, cross_attention_dim {config['cross_attention_dim']}, "
        f"{settings.latent}x{settings.latent} latents, {settings.dtype}"
        + (", gradient checkpointing" if settings.gradient_checkpointing else ""),
        f"Lily: r={settings.spec.r}, stride_A={settings.spec.stride_A}, num_B={settings.spec.num_B} on "
        f"{list(settings.spec.target_modules)}",
        f"training batch {settings.train_batch}, inference CFG batch {settings.cfg_batch}; median of "
        f"{settings.repeats} interleaved runs after {settings.warmup} warm-up rounds",
        f"wall time: {wall_s:.0f} s",
    ]


# ---------------------------------------------------------------- driver


def run_benchmark(settings: Settings, argv: list[str]) -> Results:
    """Every figure for every contender; returns key -> figures."""
    unet = build_unet(settings)
    contenders = registry(unet, settings.spec)
    keys = [key for key in contenders if settings.contenders is None or key in settings.contenders]
    results: Results = {}
    on_cpu = torch.device(settings.device).type == "cpu"
    if "memory" in settings.figures and on_cpu:
        for key, memory in measure_memory_cpu(argv, keys).items():
            results.setdefault(key, {}).update(memory)
    prepared = {key: prepare(unet, settings.spec, key, contenders[key], settings.torch_dtype) for key in keys}
    for key, item in prepared.items():
        results.setdefault(key, {}).update(label=item.label, trainable=item.num_trainable)
        results[key]["unique_bytes"] = item.unique_parameter_bytes
    if "size" in settings.figures:
        for key, item in prepared.items():
            results[key]["file_bytes"] = file_bytes(item)
    train_inputs = unet_inputs(unet, settings.train_batch, settings, settings.seed)
    steps = {key: TrainingStep(item, train_inputs, settings) for key, item in prepared.items()}
    if "train" in settings.figures:
        logger.info("training steps: %s", ", ".join(keys))
        for key, timing in interleaved_medians(steps, settings.repeats, settings.warmup, settings).items():
            results[key].update(train_s=timing.wall_s, train_cpu_s=timing.cpu_s)
        for key, step in steps.items():
            missing = step.layers_without_gradient()
            if missing:
                raise RuntimeError(f"{key}: {len(missing)} adapted layers got no gradient, e.g. {missing[:3]}")
    if "memory" in settings.figures and not on_cpu:
        for key, memory in measure_memory_cuda(steps).items():
            results[key].update(memory)
    if "inference" in settings.figures:
        cfg_inputs = unet_inputs(unet, settings.cfg_batch, settings, settings.seed + 1)
        forwards = {key: inference_forward(item, cfg_inputs, settings) for key, item in prepared.items()}
        logger.info("inference forwards: %s", ", ".join(keys))
        for key, timing in interleaved_medians(forwards, settings.repeats, settings.warmup, settings).items():
            results[key].update(inference_s=timing.wall_s, inference_cpu_s=timing.cpu_s)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-sdxl", action="store_true", help="the exact SDXL UNet config (64x64 latents on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: 128x128 latents, checkpointing)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="base dtype (cuda default: fp16)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32 / 64 / 128)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 2, 1 for full SDXL)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per contender (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--figures", default=",".join(FIGURES), help=f"comma-separated subset of {FIGURES}")
    parser.add_argument("--contenders", default=None, help="comma-separated contender keys (default: all)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="cuda: train without it")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (CPU default 1: on a shared machine two OpenMP threads spinning at barriers make "
        "single steps 10-100x slower at random; ratios, not absolute speed, are the result)",
    )
    parser.add_argument("--output", type=Path, default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    cuda = torch.device(args.device).type == "cuda"
    figures = tuple(f for f in args.figures.split(",") if f)
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        raise SystemExit(f"unknown figures {unknown}; choose from {FIGURES}")
    return Settings(
        device=args.device,
        dtype=args.dtype or ("fp16" if cuda else "fp32"),
        full_sdxl=args.full_sdxl,
        latent=args.latent or (128 if cuda else 64 if args.full_sdxl else 32),
        train_batch=args.train_batch or (1 if args.full_sdxl else 2),
        repeats=args.repeats,
        warmup=args.warmup,
        gradient_checkpointing=cuda and not args.no_gradient_checkpointing,
        figures=figures,
        contenders=tuple(args.contenders.split(",")) if args.contenders else None,
    )


NOTES = [
    "- Ratios are what this benchmark reports: every contender runs on the same base UNet (weight-sharing "
    "copies), interleaved A B C A B C, medians after warm-up. The process CPU time is shown next to the wall "
    "clock: when both agree, other jobs on the machine did not skew the comparison.",
    "- CPU runs use one torch thread unless `--threads` says otherwise: on a machine shared with other jobs, "
    "two OpenMP threads spinning at barriers made single steps 10-100x slower at random.",
    "- The inference target is judged at SDXL widths, as the issue states it (`--full-sdxl`, "
    "results/speed_full_sdxl.md): at reduced width a rank-32 adapter is large next to 128/256-wide layers. "
    "The file target is judged everywhere: at reduced width the safetensors header (one key per router, "
    "the on-disk format of the design) is large next to 8 MB of weights.",
    "- Where the time goes and why: results/profile.md, results/profile_full_sdxl.md and results/speed_analysis.md.",
]


def default_output(settings: Settings) -> Path:
    name = "speed" + ("_full_sdxl" if settings.full_sdxl else "") + ("_cuda" if settings.device != "cpu" else "")
    return RESULTS_DIR / f"{name}.md"


def main(argv: list[str] | None = None) -> Results:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    settings = settings_from_args(args)
    if args.memory_child:
        print(json.dumps(memory_child(settings, args.memory_child)))
        return {}
    started = time.perf_counter()
    results = run_benchmark(settings, argv)
    tables = dict(iter_tables(results, settings.full_sdxl))
    for title, table in tables.items():
        print(f"\n{title}\n{table}")
    output = args.output or default_output(settings)
    output.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.speed " + " ".join(argv)
    title = f"Lily speed benchmark ({'exact SDXL UNet' if settings.full_sdxl else 'SDXL UNet at reduced width'})"
    facts = run_facts(settings, command.strip(), time.perf_counter() - started)
    text = markdown(title, facts, tables, NOTES)
    flops = marked_section(output.read_text(), "benchmarks.flops") if output.exists() else None
    output.write_text(f"{text}\n{flops}\n" if flops else text)  # keep the FLOP table of benchmarks.flops
    logger.info("wrote %s", output)
    return results


if __name__ == "__main__":
    main()
