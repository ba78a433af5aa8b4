"""The exact SDXL architecture (random weights) through the real command lines, on CPU, with time and memory.

    python -m benchmarks.full_sdxl_e2e --steps 3 --resolution 256      # ~30 min, ~7 GB disk, ~15-19 GB RAM
    python -m benchmarks.full_sdxl_e2e --steps 1 --resolution 64 --divisor 32 --output /tmp/e2e.md   # seconds

Phases, each a child process whose wall time and peak RSS (`os.wait4`) are recorded:
build the pipeline folder (`python -m toyworld.full_sdxl`, fp16 variant); `train_dreambooth_lily.py` with Lily for
`--steps` steps (gradient checkpointing, bf16 mixed precision, text encoders trained, prior preservation with two
generated class images, a checkpoint every `--steps - 1` steps), then resumed from `latest` to one step more; the
same with LoRA rank 4; `load_lily_weights` into a fresh pipeline and a 2-step generation; `lily-grid` with the base,
Lily and LoRA columns. The results file gets the per-phase table, the adapter file sizes, parameter counts and the
folder sizes. The work folder (the model is 6.9 GB at full size) is deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from toyworld.full_sdxl import DIVISORS, FP16_VARIANT, folder_bytes
from toyworld.runner import popen_dying_with_parent

from .report import format_table, machine_description, versions

logger = logging.getLogger("full_sdxl_e2e")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "full_sdxl_e2e.md"
PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of a dog"
TRAINABLE = re.compile(r"(lily|lora): ([\d,]+) trainable parameters")


@dataclass
class Phase:
    """One child process: what ran, how long, how much memory."""

    name: str
    command: list[str]
    wall_s: float
    peak_rss_bytes: int
    output: str


def run_phase(name: str, command: list[str], log_dir: Path) -> Phase:
    """Run `command` to its end (killed if this process is); its output goes to log_dir/<name>.log; a failure
    raises with the log's tail."""
    log = log_dir / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    logger.info("%s: %s", name, " ".join(command))
    started = time.perf_counter()
    with log.open("w") as handle:
        process = popen_dying_with_parent(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS (kB on Linux)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    output = log.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"phase {name} failed (exit {process.returncode}); end of {log}:\n{output[-4000:]}")
    logger.info("%s: %.0f s, peak RSS %.2f GB", name, wall, usage.ru_maxrss * 1024 / 1e9)
    return Phase(name, command, wall, usage.ru_maxrss * 1024, output)


def write_instance_images(folder: Path, resolution: int, count: int = 2) -> Path:
    """`count` images of a 'subject' (a red square on blue, shifted), `resolution` pixels square."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (resolution, resolution), (30, 60, 200))
        quarter = resolution // 4
        ImageDraw.Draw(image).rectangle(
            (quarter + index * 4, quarter, 3 * quarter + index * 4, 3 * quarter), fill=(230, 30, 30)
        )
        image.save(folder / f"subject_{index}.png")
    return folder


def training_command(model: Path, work: Path, adapter: str, steps: int, resolution: int, resume: bool) -> list[str]:
    """The real CLI, as the issue asks: checkpointing, bf16, text encoders, prior preservation."""
    command = [
        sys.executable, str(REPO / "train_dreambooth_lily.py"),
        "--pretrained_model_name_or_path", str(model), "--variant", FP16_VARIANT,
        "--instance_data_dir", str(work / "instance"), "--instance_prompt", PROMPT,
        "--with_prior_preservation", "--class_data_dir", str(work / "class"), "--class_prompt", CLASS_PROMPT,
        "--num_class_images", "2", "--sample_batch_size", "1",
        "--output_dir", str(work / adapter), "--resolution", str(resolution), "--train_batch_size", "1",
        "--max_train_steps", str(steps + 1 if resume else steps), "--checkpointing_steps", str(max(1, steps - 1)),
        "--gradient_checkpointing", "--mixed_precision", "bf16", "--train_text_encoder",
        "--learning_rate", "1e-4", "--seed", "0", "--report_to", "none",
        "--adapter", adapter,
    ]  # fmt: skip
    if adapter == "lora":
        command += ["--rank", "4"]
    if resume:
        command += ["--resume_from_checkpoint", "latest"]
    return command


def generate_child(model: str, weights: str, resolution: int, output: str) -> None:
    """In a child: a fresh pipeline from the fp16 folder (fp32), `load_lily_weights`, a 2-step generation."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from lily_diffusion import load_lily_weights

    torch.set_num_threads(1)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, variant=FP16_VARIANT, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load_lily_weights(pipe, weights)
    generator = torch.Generator().manual_seed(0)
    image = pipe(PROMPT, num_inference_steps=2, height=resolution, width=resolution, generator=generator).images[0]
    image.save(output)
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
    print(json.dumps({"image": output, "pixel_std": float(pixels.std())}))


def parameter_counts(divisor: int) -> dict[str, int]:
    """Parameters of each model of the build, counted on the meta device."""
    from accelerate import init_empty_weights

    from toyworld.full_sdxl import build_full_sdxl_pipeline
    from toyworld.full_sdxl import parameter_counts as count

    with init_empty_weights():
        return count(build_full_sdxl_pipeline(divisor))


def run(args: argparse.Namespace, work: Path) -> tuple[list[Phase], dict[str, object]]:
    """Every phase in order; returns the phases and the recorded figures."""
    model, logs = work / "sdxl", work / "logs"
    logs.mkdir(parents=True)
    write_instance_images(work / "instance", args.resolution)
    python = sys.executable
    phases = [
        run_phase("build", [python, "-m", "toyworld.full_sdxl", str(model), "--divisor", str(args.divisor)], logs)
    ]
    figures: dict[str, object] = {"model_folder_bytes": folder_bytes(model)}
    for adapter in ("lily", "lora"):
        for resume in (False, True):
            name = f"{adapter} {'resume to step ' + str(args.steps + 1) if resume else str(args.steps) + ' steps'}"
            command = training_command(model, work, adapter, args.steps, args.resolution, resume)
            phases.append(run_phase(name.replace(" ", "_"), command, logs))
            phases[-1].name = name
            found = TRAINABLE.findall(phases[-1].output)
            if found:
                figures[f"{adapter}_trainable"] = int(found[-1][1].replace(",", ""))
        weight_file = work / adapter / f"pytorch_{adapter}_weights.safetensors"
        figures[f"{adapter}_file_bytes"] = weight_file.stat().st_size
        checkpoints = sorted(p.name for p in (work / adapter).glob("checkpoint-*"))
        figures[f"{adapter}_checkpoints"] = checkpoints
        figures[f"{adapter}_output_bytes"] = folder_bytes(work / adapter)
    generate = [python, "-m", "benchmarks.full_sdxl_e2e", "--generate-child", str(model), str(work / "lily"),
                str(args.resolution), str(work / "generated.png")]  # fmt: skip
    phases.append(run_phase("load_lily_weights_and_generate", generate, logs))
    figures["generated"] = json.loads(phases[-1].output.strip().splitlines()[-1])
    grid = work / "grid.png"
    grid_command = [python, "-m", "lily_diffusion.grids", "--pretrained_model_name_or_path", str(model),
                    "--variant", FP16_VARIANT, "--adapter", f"lily={work / 'lily'}", "--adapter",
                    f"lora={work / 'lora'}", "--prompt", PROMPT, "--seed", "0", "--num_inference_steps", "2",
                    "--resolution", str(args.resolution), "--output", str(grid)]  # fmt: skip
    phases.append(run_phase("lily-grid", grid_command, logs))
    with Image.open(grid) as image:
        figures["grid_size"] = image.size
    figures["class_images"] = len(list((work / "class").iterdir()))
    figures["parameters"] = parameter_counts(args.divisor)
    figures["work_folder_bytes"] = folder_bytes(work)
    return phases, figures


def gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def report(
    args: argparse.Namespace, argv: list[str], phases: list[Phase], figures: dict[str, object], wall: float
) -> str:
    """The results file."""
    parameters = figures["parameters"]
    assert isinstance(parameters, dict)
    rows = [[p.name, f"{p.wall_s:.0f}", gb(p.peak_rss_bytes)] for p in phases]
    rows.append(["total", f"{sum(p.wall_s for p in phases):.0f}", gb(max(p.peak_rss_bytes for p in phases))])
    size = "exact SDXL base" if args.divisor == 1 else f"SDXL base with every width divided by {args.divisor}"
    lines = [
        f"# SDXL end to end on CPU ({size}, random weights)",
        "",
        f"- command: `python -m benchmarks.full_sdxl_e2e {' '.join(argv)}`",
        f"- machine: {machine_description('cpu')}",
        f"- versions: {versions()}",
        f"- wall time: {wall:.0f} s; peak RSS of any phase (its own child process, `os.wait4`): "
        f"{gb(max(p.peak_rss_bytes for p in phases))} GB",
        f"- resolution {args.resolution} px, {args.steps} steps then resumed to step {args.steps + 1}, batch 1, "
        "`--gradient_checkpointing --mixed_precision bf16 --train_text_encoder --with_prior_preservation "
        f"--num_class_images 2 --checkpointing_steps {max(1, args.steps - 1)}`",
        "",
        "## Phases",
        "",
        format_table(["phase", "wall s", "peak RSS GB"], rows),
        "",
        "The first training phase (Lily) also generates the 2 class images with the base pipeline (50 denoising "
        "steps each, at the training resolution); the LoRA phases reuse them.",
        "",
        "## Sizes",
        "",
        format_table(
            ["what", "value"],
            [
                ["UNet parameters", f"{parameters['unet']:,}"],
                ["text encoder parameters", f"{parameters['text_encoder']:,}"],
                ["text encoder 2 parameters", f"{parameters['text_encoder_2']:,}"],
                ["VAE parameters", f"{parameters['vae']:,}"],
                ["model folder bytes (fp16 variant)", f"{figures['model_folder_bytes']:,}"],
                ["Lily trainable parameters (UNet + text encoders)", f"{figures.get('lily_trainable', 0):,}"],
                ["LoRA r4 trainable parameters (UNet + text encoders)", f"{figures.get('lora_trainable', 0):,}"],
                ["Lily weight file bytes", f"{figures['lily_file_bytes']:,}"],
                ["LoRA weight file bytes", f"{figures['lora_file_bytes']:,}"],
                ["Lily output folder bytes (with checkpoints)", f"{figures['lily_output_bytes']:,}"],
                ["LoRA output folder bytes (with checkpoints)", f"{figures['lora_output_bytes']:,}"],
                ["checkpoints (Lily / LoRA)", f"{figures['lily_checkpoints']} / {figures['lora_checkpoints']}"],
                ["class images generated", str(figures["class_images"])],
                ["grid size (px)", "x".join(str(v) for v in figures["grid_size"])],
                ["work folder bytes at the end", f"{figures['work_folder_bytes']:,}"],
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps before the resume (then one more)")
    parser.add_argument("--resolution", type=int, default=256, help="training and generation size, multiple of 8")
    parser.add_argument("--divisor", type=int, default=1, choices=DIVISORS, help="divide every width (1: exact)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the model is 6.9 GB)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file")
    parser.add_argument("--generate-child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.generate_child:
        model, weights, resolution, output = args.generate_child
        generate_child(model, weights, int(resolution), output)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="full_sdxl_e2e_", dir=args.workdir))
    started = time.perf_counter()
    try:
        phases, figures = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(args, argv, phases, figures, wall))
    logger.info("wrote %s (%.0f s)", args.output, wall)
    return {"phases": phases, **figures}


if __name__ == "__main__":
    main()
