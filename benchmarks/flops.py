"""FLOPs of one training step and one CFG inference step of the exact SDXL UNet at 1024 px, per adapter.

    python -m benchmarks.flops          # prints the table, writes it into benchmarks/results/speed.md

Counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device: real shapes and the real
dispatch of every module (diffusers, peft, ours), no memory and no arithmetic, so the figures are the
same on every machine. What is counted is what FlopCounterMode counts: matrix products and convolutions
(attention as its two products on the meta device), forward and backward; elementwise work (norms,
activations, softmax, the optimizer update) is not. Contenders: the base UNet, peft LoRA rank 4 on the
diffusers DreamBooth targets, our Lily with the default `LilyConfig`, and peft's Lily with the same r,
stride_A and num_B.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, addmm_flop, baddbmm_flop

from lily_diffusion import LilyConfig
from toyworld.sdxl_config import build_sdxl_unet_on_meta

from .contenders import (
    AdapterSpec,
    Contender,
    attach_base,
    attach_ours,
    attach_peft_lily,
    attach_peft_lora,
    weight_sharing_copy,
)
from .report import format_table, machine_description, replace_marked_section, versions

logger = logging.getLogger("flops")
SPEED_RESULTS = Path(__file__).resolve().parent / "results" / "speed.md"
MARKER = "benchmarks.flops"
TEXT_TOKENS = 77
LORA_RANK = 4  # the diffusers DreamBooth LoRA default


# FlopCounterMode knows the out-of-place products only; our adapter adds `h @ B_mix` into the base
# layer's output in place (`addmm_`/`baddbmm_`) when no graph is recorded, i.e. at inference.
# (`out=` variants count under their op already: FlopCounterMode matches the overload packet.)
def _addmm_in_place(self_shape: Any, a_shape: Any, b_shape: Any, *_: Any, **__: Any) -> int:
    return addmm_flop(self_shape, a_shape, b_shape)


def _baddbmm_in_place(self_shape: Any, a_shape: Any, b_shape: Any, *_: Any, **__: Any) -> int:
    return baddbmm_flop(self_shape, a_shape, b_shape)


IN_PLACE_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten.addmm_: _addmm_in_place,
    torch.ops.aten.baddbmm_: _baddbmm_in_place,
}
Inputs = dict[str, Any]


@dataclass(frozen=True)
class Counts:
    """FLOPs of one contender.

    `train`: forward + MSE loss + backward with the latents taking a gradient, so that every contender's
    backward runs through the whole UNet (the frozen base's training step, plus the adapter's work).
    `train_as_trained`: the same without the latent gradient, as the training script runs it (the backward
    stops at the first adapted layer; 0 for the base, which has nothing to train). `inference`: one forward
    without gradients on the CFG batch.
    """

    trainable: int
    train: int
    train_as_trained: int
    inference: int


def meta_inputs(unet: nn.Module, batch: int, latent: int, tokens: int = TEXT_TOKENS) -> Inputs:
    """SDXL conditioning on the meta device: latents, timesteps, text states, pooled embeds, time ids."""
    config = unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    meta = torch.device("meta")
    return {
        "sample": torch.empty(batch, config.in_channels, latent, latent, device=meta),
        "timestep": torch.empty(batch, dtype=torch.long, device=meta),
        "encoder_hidden_states": torch.empty(batch, tokens, config.cross_attention_dim, device=meta),
        "added_cond_kwargs": {
            "text_embeds": torch.empty(batch, text_dim, device=meta),
            "time_ids": torch.empty(batch, 6, device=meta),
        },
    }


def count_training_step(model: nn.Module, inputs: Inputs, latents_grad: bool) -> int:
    """FLOPs of forward, MSE loss and backward (0 when nothing takes a gradient)."""
    sample = inputs["sample"].detach().requires_grad_(latents_grad)
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE_FORMULAS) as counter:
        prediction = model(**{**inputs, "sample": sample}).sample
        if not prediction.requires_grad:
            return 0
        F.mse_loss(prediction.float(), torch.empty_like(prediction, dtype=torch.float32)).backward()
    return counter.get_total_flops()


def count_inference_step(model: nn.Module, inputs: Inputs) -> int:
    """FLOPs of one forward without gradients."""
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE_FORMULAS) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def contenders(spec: AdapterSpec) -> dict[str, tuple[str, Contender]]:
    """Key -> (label, attach function): base, LoRA rank 4, ours (default config), peft's Lily (same shape)."""
    return {
        "base": ("base UNet (no adapter)", attach_base),
        "lora": (
            f"peft LoRA r{LORA_RANK}",
            lambda m, s: attach_peft_lora(m, s, LORA_RANK, "lora", f"peft LoRA r{LORA_RANK}"),
        ),
        "ours": (f"ours Lily r{spec.r} (default config)", lambda m, s: attach_ours(m, s, "sample")),
        "peft-lily": (f"peft Lily r{spec.r}", attach_peft_lily),
    }


def count_contenders(
    unet: nn.Module, spec: AdapterSpec, latent: int, train_batch: int, cfg_batch: int
) -> dict[str, Counts]:
    """Counts of every contender, each on a weight-sharing copy of `unet` (frozen, any device)."""
    unet.requires_grad_(False)
    train_inputs = meta_inputs(unet, train_batch, latent)
    cfg_inputs = meta_inputs(unet, cfg_batch, latent)
    counts = {}
    for key, (label, attach) in contenders(spec).items():
        started = time.perf_counter()
        prepared = attach(weight_sharing_copy(unet), spec)
        model = prepared.model
        counts[key] = Counts(
            trainable=prepared.num_trainable,
            train=count_training_step(model, train_inputs, latents_grad=True),
            train_as_trained=count_training_step(model, train_inputs, latents_grad=False),
            inference=count_inference_step(model, cfg_inputs),
        )
        logger.info("%s: %s (%.0f s)", label, counts[key], time.perf_counter() - started)
    return counts


def ratio_text(value: int, base: int) -> str:
    return f"{value / base:.4f}" if value and base else "–"


def flop_table(counts: dict[str, Counts], spec: AdapterSpec) -> str:
    """GFLOPs and ratios: training step and CFG step to the base; the as-trained step to LoRA."""
    labels = {key: label for key, (label, _) in contenders(spec).items()}
    base, lora = counts["base"], counts.get("lora")
    headers = [
        "contender", "trainable params", "train step GFLOP", "÷ base", "CFG step GFLOP", "÷ base",
        "train step as trained GFLOP", f"÷ LoRA r{LORA_RANK}",
    ]  # fmt: skip
    rows = [
        [
            labels.get(key, key),
            f"{item.trainable:,}",
            f"{item.train / 1e9:,.1f}",
            ratio_text(item.train, base.train),
            f"{item.inference / 1e9:,.1f}",
            ratio_text(item.inference, base.inference),
            f"{item.train_as_trained / 1e9:,.1f}" if item.train_as_trained else "–",
            ratio_text(item.train_as_trained, lora.train_as_trained if lora else 0),
        ]
        for key, item in counts.items()
    ]
    return format_table(headers, rows)


def section(table: str, command: str, wall_s: float, spec: AdapterSpec, latent: int, batches: tuple[int, int]) -> str:
    """The Markdown block written between the markers in results/speed.md."""
    train_batch, cfg_batch = batches
    facts = [
        f"command: `{command}`",
        f"machine: {machine_description('cpu')}; counted on the meta device (no arithmetic: the figures do not "
        "depend on the machine)",
        f"versions: {versions()}",
        f"model: the exact SDXL base UNet config, {8 * latent} px ({latent}x{latent} latents), "
        f"{TEXT_TOKENS} text tokens; training batch {train_batch}, CFG batch {cfg_batch}",
        f"adapters on {list(spec.target_modules)}: LoRA rank {LORA_RANK} (alpha {LORA_RANK}); Lily r={spec.r}, "
        f"stride_A={spec.stride_A}, num_B={spec.num_B} (ours: the default `LilyConfig()`, sample routing; "
        "peft's LilyConfig with the same values)",
        f"wall time: {wall_s:.0f} s",
    ]
    notes = [
        "Counted by `torch.utils.flop_counter.FlopCounterMode`: matrix products and convolutions, forward and "
        "backward (attention as its two products); elementwise work and the optimizer update are not counted. "
        "A multiply-add is 2 FLOPs.",
        "train step: forward + MSE loss + backward with the latents taking a gradient, so the backward runs "
        "through the whole UNet for every contender and the base column is the frozen UNet's own training "
        "cost; the ratio is what an adapter adds. As trained: the same step as the training script runs it "
        "(no latent gradient, the backward stops at the first adapted layer).",
        "Our in-place `addmm_`/`baddbmm_` (inference) are counted with FlopCounterMode's formulas for "
        "`addmm`/`baddbmm`; FlopCounterMode alone would miss them.",
    ]
    lines = [
        "## FLOPs at 1024 px, exact SDXL UNet (machine-independent)",
        "",
        *(f"- {fact}" for fact in facts),
        "",
        table,
        "",
        *(f"- {note}" for note in notes),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=128, help="latent side (128: 1024 px)")
    parser.add_argument("--train-batch", type=int, default=1, help="training batch (FLOPs scale with it)")
    parser.add_argument("--cfg-batch", type=int, default=2, help="inference batch (2: one CFG step)")
    parser.add_argument("--output", type=Path, default=SPEED_RESULTS, help="Markdown file to write the table into")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Counts]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    spec = AdapterSpec()
    if spec.lily_config() != LilyConfig():
        raise SystemExit("AdapterSpec's Lily config is no longer LilyConfig's default; update benchmarks.flops")
    started = time.perf_counter()
    counts = count_contenders(build_sdxl_unet_on_meta(), spec, args.latent, args.train_batch, args.cfg_batch)
    table = flop_table(counts, spec)
    print(table)
    command = " ".join(["python -m benchmarks.flops", *argv])
    batches = (args.train_batch, args.cfg_batch)
    body = section(table, command, time.perf_counter() - started, spec, args.latent, batches)
    text = args.output.read_text() if args.output.exists() else ""
    args.output.write_text(replace_marked_section(text, MARKER, body))
    logger.info("wrote %s", args.output)
    return counts


if __name__ == "__main__":
    main()
