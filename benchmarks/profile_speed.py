"""Where the adapters' time goes, on the benchmark's model, training step and CFG forward.

    python -m benchmarks.profile_speed              # reduced-width SDXL UNet -> results/profile.md
    python -m benchmarks.profile_speed --full-sdxl  # exact SDXL UNet, forward only -> results/profile_full_sdxl.md

Three views, from the most robust to the most detailed:
1. one adapted layer (best-of-5 process CPU time): piece by piece, what each change in functional.py saves;
   and forward + backward per contender, what a rank-r adapter costs over LoRA's rank;
2. in situ: the share of a real UNet forward spent inside the adapters, timed within the same forward
   (so a busy machine slows both parts alike); the forward costs 1 / (1 - share) times the base's;
3. torch.profiler tables of the training step and the forward: the ops with the most extra time and
   calls over the base UNet (reduced width only).
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
from peft.tuners.lily.layer import LilyLayer as PeftLilyLayer
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lily_diffusion.adapter import lily_adapters
from lily_diffusion.functional import add_lily_

from .contenders import Prepared, prepare, registry
from .report import format_table, machine_description, markdown, versions
from .speed import RESULTS_DIR, Settings, TrainingStep, build_unet, inference_forward, unet_inputs

logger = logging.getLogger("profile_speed")
DEFAULT_CONTENDERS = ("base", "lora-matched", "peft-lily", "ours-sample")
OpTimes = dict[str, tuple[float, int]]  # op name -> (self ms per call, calls per call)


# ---------------------------------------------------------------- 1. one layer, piece by piece


def cpu_us(task: Callable[[], object], calls: int = 100, repeats: int = 5) -> float:
    """Best-of-`repeats` process CPU microseconds per call."""
    task()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            task()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def adapter_pieces(tokens: int, width: int, r: int = 32, num_B: int = 8) -> list[list[str]]:
    """The pieces of one adapted layer (no grad), as peft computes them and as ours does."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens // 2, width, generator=generator)
    A, W = torch.randn(r, width, generator=generator), torch.randn(width, width, generator=generator)
    router, B_mix = torch.randn(num_B, r, generator=generator), torch.randn(2, r, width, generator=generator)
    h = F.linear(x, A)
    logits, logits_t = F.linear(h, router), F.linear(router, h.reshape(-1, r))
    probabilities, probabilities_t = logits.softmax(-1), logits_t.softmax(0)
    grad, grad_t = torch.randn_like(probabilities), torch.randn_like(probabilities_t)
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


def training_layer_costs(tokens: int, width: int, r: int = 32, num_B: int = 8, lora_rank: int = 4) -> list[list[str]]:
    """Forward + backward of one adapted layer (grad to x and to every adapter weight), per contender.

    The adapter's own share is what each row adds to the frozen base Linear. The "down-projection
    only" row is the floor any rank-r adapter pays: the x-sized GEMMs of h = x A^T (forward, grad x,
    grad A) are r / lora_rank times LoRA's.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens // 2, width, generator=generator, requires_grad=True)
    W = torch.randn(width, width, generator=generator) / width**0.5
    A = (torch.randn(r, width, generator=generator) / width**0.5).requires_grad_()
    router = torch.randn(num_B, r, generator=generator).requires_grad_()
    B = (torch.randn(num_B, r, width, generator=generator) / r).requires_grad_()
    lora_A = (torch.randn(lora_rank, width, generator=generator) / width**0.5).requires_grad_()
    lora_B = (torch.randn(width, lora_rank, generator=generator) / lora_rank).requires_grad_()
    grad = torch.randn(2, tokens // 2, width, generator=generator)
    layers: dict[str, Callable[[], torch.Tensor]] = {
        "base Linear (frozen)": lambda: F.linear(x, W),
        f"+ LoRA r{lora_rank} (peft's formula)": lambda: F.linear(x, W) + F.linear(F.linear(x, lora_A), lora_B),
        f"+ down-projection only, r={r} (h = x A^T)": lambda: F.linear(x, W) + F.linear(x, A).sum(-1, keepdim=True),
        f"+ Lily r={r}, num_B={num_B} (ours, sample routing)": lambda: add_lily_(
            F.linear(x, W), F.linear(x, A), router, B, 1.0, "sample"
        ),
    }
    costs = {name: cpu_us(lambda layer=layer: layer().backward(grad), calls=50) for name, layer in layers.items()}
    base = costs["base Linear (frozen)"]
    return [[name, f"{cost:.1f}", "–" if cost is base else f"{cost - base:+.1f}"] for name, cost in costs.items()]


# ---------------------------------------------------------------- 2. in situ


class AdapterClock:
    """Process CPU seconds spent inside one model's adapters while it runs.

    peft layers: the layer's forward minus its base layer's. Ours: `LilyAdapter.add_to`, the whole
    adapter (the base `F.linear` runs before it).
    """

    def __init__(self, model: nn.Module) -> None:
        self.seconds = 0.0
        self._started: dict[int, float] = {}
        for module in model.modules():
            if isinstance(module, (LoraLayer, PeftLilyLayer)):
                self._clock(module, 1.0)
                self._clock(module.get_base_layer(), -1.0)
        for adapter in lily_adapters(model).values():
            adapter.add_to = self._timed(adapter.add_to)

    def _clock(self, module: nn.Module, sign: float) -> None:
        def start(*_: object) -> None:
            self._started[id(module)] = time.process_time()

        def stop(*_: object) -> None:
            self.seconds += sign * (time.process_time() - self._started.pop(id(module)))

        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop)

    def _timed(self, add_to: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def timed(*args: object) -> torch.Tensor:
            start = time.process_time()
            result = add_to(*args)
            self.seconds += time.process_time() - start
            return result

        return timed


def adapter_share(prepared: Prepared, forward: Callable[[], None], calls: int) -> tuple[float, float]:
    """(seconds per forward, share of it inside the adapters), measured within the same forwards."""
    clock = AdapterClock(prepared.model)
    forward()
    clock.seconds = 0.0
    start = time.process_time()
    for _ in range(calls):
        forward()
    total = time.process_time() - start
    return total / calls, clock.seconds / total


def in_situ_table(items: dict[str, Prepared], forwards: dict[str, Callable[[], None]], calls: int) -> str:
    rows = []
    for key, item in items.items():
        if key == "base":
            continue
        seconds, share = adapter_share(item, forwards[key], calls)
        logger.info("in situ %s: %.2f s, %.2f%% in the adapters", key, seconds, 100 * share)
        rows.append([item.label, f"{seconds * 1e3:.0f}", f"{100 * share:.2f}", f"{1 / (1 - share):.3f}"])
    headers = ["contender", "forward CPU ms", "% inside the adapters", "implied forward ÷ base"]
    return format_table(headers, rows)


# ---------------------------------------------------------------- 3. torch.profiler


def self_cpu_ms(task: Callable[[], None], steps: int) -> OpTimes:
    task()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            task()
    events = prof.key_averages()
    return {event.key: (event.self_cpu_time_total / 1e3 / steps, event.count // steps) for event in events}


def top_ops_table(ops: OpTimes, base: OpTimes, top: int) -> str:
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


def op_tables(unet: nn.Module, settings: Settings, keys: list[str], steps: int, top: int) -> dict[str, str]:
    contenders = registry(unet, settings.spec)
    train_inputs = unet_inputs(unet, settings.train_batch, settings, settings.seed)
    cfg_inputs = unet_inputs(unet, settings.cfg_batch, settings, settings.seed + 1)
    tables = {}
    for figure in ("training step", "inference forward"):
        measured = {}
        for key in keys:
            item = prepare(unet, settings.spec, key, contenders[key], settings.torch_dtype)
            task = TrainingStep(item, train_inputs, settings) if figure == "training step" else None
            task = task or inference_forward(item, cfg_inputs, settings)
            logger.info("profiling %s: %s", figure, key)
            measured[key] = (item.label, self_cpu_ms(task, steps))
        base = measured.get("base", ("", {}))[1]
        for label, ops in measured.values():
            tables[f"torch.profiler, {figure}: {label} (self ms per call)"] = top_ops_table(ops, base, top)
    return tables


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-sdxl", action="store_true", help="exact SDXL UNet, 64x64 latents, forward only")
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS))
    parser.add_argument("--steps", type=int, default=3, help="profiled calls (and in-situ forwards) per contender")
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps op times comparable on a busy machine")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    settings = Settings(full_sdxl=args.full_sdxl, latent=64 if args.full_sdxl else 32)
    keys = args.contenders.split(",")
    tables = {}
    widths = ((2048, 640), (512, 1280)) if args.full_sdxl else ((512, 128), (128, 256))
    for tokens, width in widths:
        title = f"One adapted layer, piece by piece: {tokens} tokens, {width} -> {width}, r=32, num_B=8"
        tables[title] = format_table(["piece (no grad)", "CPU µs per call"], adapter_pieces(tokens, width))
        title = f"One adapted layer, forward + backward: {tokens} tokens, {width} -> {width}"
        headers = ["layer", "CPU µs per call", "adapter's own µs"]
        tables[title] = format_table(headers, training_layer_costs(tokens, width))
    unet = build_unet(settings)
    contenders = registry(unet, settings.spec)
    items = {key: prepare(unet, settings.spec, key, contenders[key], settings.torch_dtype) for key in keys}
    cfg_inputs = unet_inputs(unet, settings.cfg_batch, settings, settings.seed + 1)
    forwards = {key: inference_forward(item, cfg_inputs, settings) for key, item in items.items()}
    tables["In situ: share of the CFG forward spent inside the adapters"] = in_situ_table(items, forwards, args.steps)
    if not args.full_sdxl:
        tables.update(op_tables(unet, settings, keys, args.steps, args.top))
    command = "python -m benchmarks.profile_speed " + " ".join(sys.argv[1:] if argv is None else argv)
    facts = [
        f"command: `{command.strip()}`",
        f"machine: {machine_description(settings.device)}",
        f"versions: {versions()}",
        f"model: {'exact SDXL UNet' if args.full_sdxl else 'SDXL UNet at reduced width (64, 128, 256)'}, "
        f"{settings.latent}x{settings.latent} latents, training batch {settings.train_batch}, CFG batch "
        f"{settings.cfg_batch}, {args.steps} calls per contender",
    ]
    output = args.output or RESULTS_DIR / ("profile_full_sdxl.md" if args.full_sdxl else "profile.md")
    title = "Profile of the adapters (see benchmarks/results/speed_analysis.md for the reading)"
    output.write_text(markdown(title, facts, tables))
    print(output.read_text())


if __name__ == "__main__":
    main()
