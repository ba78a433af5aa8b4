"""Where the adapters' time goes: torch.profiler over the benchmark's training step and CFG forward.

    python benchmarks/profile_speed.py [--contenders base,lora-matched,peft-lily,ours-sample] [--steps 3]

For each contender the ops' self CPU time is summed over `--steps` profiled calls (after a warm-up);
the tables show the top ops and, per op, the extra time over the base UNet: the adapter's cost.
Writes benchmarks/results/profile.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from contenders import prepare, registry
from report import format_table, machine_description
from speed import RESULTS_DIR, Settings, TrainingStep, build_unet, inference_forward, unet_inputs
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger("profile_speed")
DEFAULT_CONTENDERS = ("base", "lora-matched", "peft-lily", "ours-sample")


def self_cpu_ms(task: Callable[[], None], steps: int) -> dict[str, tuple[float, int]]:
    """op name -> (self CPU ms per call, op count per call), over `steps` calls of `task`."""
    task()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            task()
    return {
        event.key: (event.self_cpu_time_total / 1e3 / steps, event.count // steps) for event in prof.key_averages()
    }


def top_ops_table(ops: dict[str, tuple[float, int]], base: dict[str, tuple[float, int]], top: int) -> str:
    """The `top` ops by extra time over the base (by own time when `ops` is the base)."""
    total = sum(ms for ms, _ in ops.values())

    def order(item: tuple[str, tuple[float, int]]) -> float:
        name, (ms, _) = item
        return -(ms if ops is base else ms - base.get(name, (0.0, 0))[0])

    rows = []
    for name, (ms, count) in sorted(ops.items(), key=order)[:top]:
        base_ms, base_count = base.get(name, (0.0, 0))
        delta_ms, delta_count = f"{ms - base_ms:+.1f}", f"{count - base_count:+d}"
        rows.append([name, f"{ms:.1f}", f"{100 * ms / total:.1f}", str(count), delta_ms, delta_count])
    rows.append(["total", f"{total:.1f}", "100", "", f"{total - sum(ms for ms, _ in base.values()):+.1f}", ""])
    return format_table(["op", "self ms", "%", "calls", "Δ ms vs base", "Δ calls vs base"], rows)


def cpu_us(task: Callable[[], object], calls: int = 200, repeats: int = 5) -> float:
    """Best-of-`repeats` process CPU microseconds per call (robust on a machine shared with other jobs)."""
    task()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            task()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def adapter_pieces(tokens: int, width: int, r: int = 32, num_B: int = 8) -> list[list[str]]:
    """The pieces of one adapted layer (no grad), before and after the changes in functional.py."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens // 2, width, generator=generator)
    A, W = torch.randn(r, width, generator=generator), torch.randn(width, width, generator=generator)
    router = torch.randn(num_B, r, generator=generator)
    h = F.linear(x, A)
    h2d = h.reshape(-1, r)
    logits, logits_t = F.linear(h, router), F.linear(router, h2d)
    probabilities, probabilities_t = logits.softmax(-1), logits_t.softmax(0)
    grad, grad_t = torch.randn_like(probabilities), torch.randn_like(probabilities_t)
    B_mix = torch.randn(2, r, width, generator=generator)
    base = F.linear(x, W)
    pieces = {
        "base Linear (for scale)": lambda: F.linear(x, W),
        "down-projection h = x A^T": lambda: F.linear(x, A),
        "router softmax over a last dim of num_B (peft; ours before)": lambda: logits.softmax(-1),
        "router softmax over dim 0 of [num_B, tokens] (ours)": lambda: logits_t.softmax(0),
        "softmax backward, last dim (peft; ours before)": lambda: torch._softmax_backward_data(
            grad, probabilities, -1, torch.float32
        ),
        "softmax backward, dim 0 (ours)": lambda: torch._softmax_backward_data(
            grad_t, probabilities_t, 0, torch.float32
        ),
        "up: bmm, * scaling, .to, + base (peft; ours before)": lambda: base + (torch.bmm(h, B_mix) * 0.5).to(x.dtype),
        "up: baddbmm_ into the base output, scaling in w (ours)": lambda: base.baddbmm_(h, B_mix),
    }
    with torch.no_grad():
        return [[name, f"{cpu_us(task):.1f}"] for name, task in pieces.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps op times comparable on a busy machine")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "profile.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    settings = Settings()
    unet = build_unet(settings)
    contenders = registry(unet, settings.spec)
    keys = args.contenders.split(",")
    train_inputs = unet_inputs(unet, settings.train_batch, settings, settings.seed)
    cfg_inputs = unet_inputs(unet, settings.cfg_batch, settings, settings.seed + 1)
    sections = [
        "# Profile of the speed benchmark (torch.profiler, self CPU time per call)",
        "",
        f"- command: `python benchmarks/profile_speed.py {' '.join(argv or sys.argv[1:])}`".replace("  ", " "),
        f"- machine: {machine_description(settings.device)}; reduced-width SDXL UNet, "
        f"{settings.latent}x{settings.latent} latents, training batch {settings.train_batch}, "
        f"CFG batch {settings.cfg_batch}, {args.steps} calls each",
        "",
    ]
    for tokens, width in ((512, 128), (128, 256)):
        rows = adapter_pieces(tokens, width)
        title = f"## One adapted layer, piece by piece: {tokens} tokens, {width} -> {width}, r=32, num_B=8"
        sections += [title, "", format_table(["piece (no grad)", "CPU µs per call"], rows), ""]
    for figure in ("training step", "inference forward"):
        measured = {}
        for key in keys:
            prepared = prepare(unet, settings.spec, key, contenders[key], settings.torch_dtype)
            if figure == "training step":
                task = TrainingStep(prepared, train_inputs, settings)
            else:
                task = inference_forward(prepared, cfg_inputs, settings)
            logger.info("profiling %s: %s", figure, key)
            measured[key] = (prepared.label, self_cpu_ms(task, args.steps))
        base = measured.get("base", ("", {}))[1]
        for label, ops in measured.values():
            sections += [f"## {figure}: {label}", "", top_ops_table(ops, base, args.top), ""]
    args.output.write_text("\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
