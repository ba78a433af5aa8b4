"""What `lily-inspect` writes: a text table, a JSON file and PNG plots (matplotlib, `diagnostics` extra)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .analysis import ExpertUse, LayerAnalysis, lora_group
from .lora import LoraLayerStats
from .weights import LilyWeightStats

logger = logging.getLogger(__name__)

PLOT_NAMES = ("expert_weights_heatmap.png", "effective_rank.png", "expert_use.png")
_ABBREVIATIONS = (
    ("text_model.encoder.layers.", "L"),
    ("down_blocks.", "down"),
    ("up_blocks.", "up"),
    ("mid_block.", "mid."),
    ("attentions.", "att"),
    ("transformer_blocks.", "tb"),
    ("self_attn.", ""),
)
_COMPONENTS = {"unet": "", "text_encoder": "te1.", "text_encoder_2": "te2.", "model": ""}


@dataclass
class InspectionReport:
    """Everything one `lily-inspect` run found; `layers` and `heatmap` are empty without `--pipeline`."""

    adapter: str
    lora: str | None
    pipeline: str | None
    weights: LilyWeightStats
    lora_layers: list[LoraLayerStats]
    expert_use: list[ExpertUse]
    summary: dict[str, float | int | None]
    layers: list[LayerAnalysis] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    heatmap: dict[str, list[list[float]]] = field(default_factory=dict)  # UNet layer -> [step][expert]


def short_name(key: str) -> str:
    """`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `down1.att0.tb0.attn1.to_q`."""
    component, _, path = key.partition(".")
    for long, short in _ABBREVIATIONS:
        path = path.replace(long, short)
    return _COMPONENTS.get(component, component + ".") + path


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _columns(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def format_table(report: InspectionReport) -> str:
    """The printed table: per layer with activations, per expert pool always, then the summary lines."""
    lines: list[str] = []
    if report.layers:
        headers = ["layer", "H(p)", "log nB", "TV all", "TV prompts", "TV steps", "max TV"]
        headers += ["erank/input", "erank stacked", "LoRA erank"]
        rows = [
            [
                short_name(la.key),
                _fmt(la.router_entropy),
                _fmt(la.max_entropy),
                _fmt(la.tv_spread, 3),
                _fmt(la.tv_prompts, 3),
                _fmt(la.tv_timesteps, 3),
                _fmt(la.max_tv, 3),
                _fmt(la.per_input_effective_rank),
                _fmt(la.stacked_effective_rank),
                _fmt(la.lora_effective_rank),
            ]
            for la in report.layers
        ]
        lines += [*_columns(headers, rows), ""]
    lora_by_group = _lora_by_group(report)
    headers = ["pool", "nB x r", "expert norms", "expert shares", "unused", "pool erank", "LoRA erank (mean)"]
    rows = [
        [
            _COMPONENTS.get(use.component, use.component + ".") + use.group,
            f"{pool.num_B}x{pool.r}",
            " ".join(f"{n:.2f}" for n in pool.expert_norms),
            " ".join(f"{s:.2f}" for s in use.shares),
            ",".join(map(str, use.unused)) or "-",
            _fmt(pool.pool_effective_rank),
            _fmt(lora_by_group.get((use.component, use.group))),
        ]
        for pool, use in zip(report.weights.pools, report.expert_use, strict=True)
    ]
    lines += [*_columns(headers, rows), ""]
    lines += [f"{key}: {_fmt(value, 3)}" for key, value in report.summary.items()]
    return "\n".join(lines)


def _lora_by_group(report: InspectionReport) -> dict[tuple[str, str], float]:
    grouped: dict[tuple[str, str], list[float]] = {}
    for stats in report.lora_layers:
        component = stats.key.partition(".")[0]
        grouped.setdefault((component, lora_group(stats, report.weights.configs)), []).append(stats.effective_rank)
    return {key: sum(values) / len(values) for key, values in grouped.items()}


def write_json(report: InspectionReport, path: Path) -> None:
    """The whole report as JSON (floats as numbers; NaN written as null)."""

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(dataclasses.asdict(report)), indent=1) + "\n")


def write_plots(report: InspectionReport, out_dir: Path) -> list[Path]:
    """The three PNGs (the heatmap only with activations); returns the paths written."""
    plots: list[tuple[str, Callable[[InspectionReport], object]]] = [
        (PLOT_NAMES[1], effective_rank_figure),
        (PLOT_NAMES[2], expert_use_figure),
    ]
    if report.heatmap:
        plots.insert(0, (PLOT_NAMES[0], heatmap_figure))
    written = []
    for name, draw in plots:
        figure = draw(report)
        figure.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        written.append(out_dir / name)
    logger.info("Wrote %s.", ", ".join(str(p) for p in written))
    return written


def heatmap_figure(report: InspectionReport):
    """One panel per expert: its mean weight (over prompts), layers down, denoising timesteps across."""
    from matplotlib.figure import Figure

    keys = list(report.heatmap)
    num_B = len(report.heatmap[keys[0]][0])
    figure = Figure(figsize=(2.2 * num_B + 2.5, 0.22 * len(keys) + 1.6))
    axes = figure.subplots(1, num_B, sharey=True, squeeze=False)[0]
    image = None
    for expert, axis in enumerate(axes):
        values = [[step[expert] for step in report.heatmap[key]] for key in keys]
        image = axis.imshow(values, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        axis.set_title(f"expert {expert}", fontsize=9)
        axis.set_xticks(range(len(report.timesteps)), [f"{t:.0f}" for t in report.timesteps], fontsize=7)
        axis.set_xlabel("timestep", fontsize=8)
    axes[0].set_yticks(range(len(keys)), [short_name(k) for k in keys], fontsize=7)
    figure.colorbar(image, ax=list(axes), label="expert weight p (mean over prompts)")
    figure.suptitle("Router expert weights, layer x timestep", fontsize=10)
    return figure


def effective_rank_figure(report: InspectionReport):
    """Per layer (with activations) or per pool: Lily's effective ranks next to LoRA's."""
    from matplotlib.figure import Figure

    if report.layers:
        labels = [short_name(la.key) for la in report.layers]
        series = {
            "Lily, per input": [la.per_input_effective_rank for la in report.layers],
            "Lily, stacked over inputs": [la.stacked_effective_rank for la in report.layers],
            "LoRA": [la.lora_effective_rank or 0.0 for la in report.layers],
        }
    else:
        lora = _lora_by_group(report)
        labels = [_COMPONENTS.get(p.component, p.component + ".") + p.group for p in report.weights.pools]
        series = {
            "Lily, expert pool (reach)": [p.pool_effective_rank for p in report.weights.pools],
            "LoRA (mean of the group's layers)": [lora.get((p.component, p.group), 0.0) for p in report.weights.pools],
        }
    if not report.lora_layers:
        series = {k: v for k, v in series.items() if not k.startswith("LoRA")}
    figure = Figure(figsize=(8, 0.3 * len(labels) * len(series) / 2 + 1.8))
    axis = figure.subplots()
    height = 0.8 / len(series)
    for index, (name, values) in enumerate(series.items()):
        axis.barh([i + index * height for i in range(len(labels))], values, height=height, label=name)
    lily_r = report.summary.get("lily_r")
    if lily_r:
        axis.axvline(lily_r, color="C0", linestyle="--", linewidth=1, label=f"Lily r = {lily_r}")
    if report.summary.get("lora_rank"):
        rank = report.summary["lora_rank"]
        axis.axvline(rank, color="C2", linestyle="--", linewidth=1, label=f"LoRA rank = {rank}")
    axis.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("effective rank (Roy & Vetterli)")
    axis.legend(fontsize=8, loc="lower right")
    axis.set_title("Effective rank of the update: Lily vs LoRA", fontsize=10)
    return figure


def expert_use_figure(report: InspectionReport):
    """Per expert pool: each expert's share of the weight (mean router weight x norm), unused ones hatched."""
    from matplotlib.figure import Figure

    uses = report.expert_use
    figure = Figure(figsize=(max(6.0, 0.45 * sum(len(u.shares) for u in uses) + 1), 3.6))
    axis = figure.subplots()
    position, ticks, tick_labels = 0, [], []
    for use in uses:
        for expert, share in enumerate(use.shares):
            unused = expert in use.unused
            axis.bar(position, share, color="lightgray" if unused else f"C{expert % 10}", hatch="//" if unused else "")
            position += 1
        ticks.append(position - (len(use.shares) + 1) / 2)
        tick_labels.append(_COMPONENTS.get(use.component, use.component + ".") + use.group)
        position += 1
    axis.set_xticks(ticks, tick_labels, rotation=30, ha="right", fontsize=7)
    axis.set_ylabel("share of the pool's weight")
    weighted = "mean router weight x expert norm" if report.layers else "expert norm (weights only)"
    axis.set_title(f"Expert use per pool ({weighted}); hatched: unused", fontsize=10)
    return figure
