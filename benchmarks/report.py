"""Tables and the results file of the speed benchmark: ratios of medians, targets, machine and versions."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import diffusers
import peft
import torch

Results = dict[str, dict[str, Any]]  # contender key -> figure name -> value


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join(
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def mib(value: float | None) -> float | None:
    return None if value is None else value / 2**20


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def absolute_table(results: Results) -> str:
    headers = [
        "contender", "trainable params", "train step ms", "÷ base", "(CPU time ÷ base)", "inference ms", "÷ base",
        "(CPU time ÷ base)", "peak train mem MiB", "Δ over resident MiB", "file bytes", "file ÷ unique bytes",
    ]  # fmt: skip
    base = results.get("base", {})
    rows = []
    for result in results.values():
        peak, before = result.get("peak_bytes"), result.get("resident_before_bytes")
        rows.append([
            result["label"],
            f"{result['trainable']:,}",
            fmt(ms(result.get("train_s")), "{:.1f}"),
            fmt(ratio(result.get("train_s"), base.get("train_s"))),
            fmt(ratio(result.get("train_cpu_s"), base.get("train_cpu_s"))),
            fmt(ms(result.get("inference_s")), "{:.1f}"),
            fmt(ratio(result.get("inference_s"), base.get("inference_s"))),
            fmt(ratio(result.get("inference_cpu_s"), base.get("inference_cpu_s"))),
            fmt(mib(peak), "{:.0f}"),
            fmt(mib(peak - before) if peak is not None and before is not None else None, "{:.0f}"),
            fmt(result.get("file_bytes"), "{:,}"),
            fmt(ratio(result.get("file_bytes"), result.get("unique_bytes"))),
        ])  # fmt: skip
    return format_table(headers, rows)


RATIO_FIGURES: tuple[tuple[str, str], ...] = (
    ("train_s", "training step (wall clock)"),
    ("train_cpu_s", "training step (process CPU time)"),
    ("inference_s", "inference forward, CFG batch (wall clock)"),
    ("inference_cpu_s", "inference forward, CFG batch (process CPU time)"),
    ("peak_bytes", "peak training memory"),
    ("file_bytes", "saved file bytes"),
)


def ratio_table(results: Results, ours: str = "ours-sample") -> str:
    """ours / each other contender, per figure."""
    others = [key for key in results if key != ours]
    headers = ["figure", *(f"{ours} ÷ {key}" for key in others)]
    rows = [
        [title, *(fmt(ratio(results[ours].get(figure), results[key].get(figure))) for key in others)]
        for figure, title in RATIO_FIGURES
        if results.get(ours, {}).get(figure) is not None
    ]
    return format_table(headers, rows)


@dataclass(frozen=True)
class Target:
    figure: str
    numerator: str  # a contender key, or "ours" for both routings
    denominator: str  # a contender key, or "unique" for the contender's unique parameter bytes
    description: str
    limit: float | None  # None: shown for comparison only
    at_sdxl_widths: bool = False  # judged only on the exact SDXL UNet (--full-sdxl)


TARGETS: tuple[Target, ...] = (
    Target("train_s", "ours", "lora-matched", "training step: ours / peft LoRA (matched)", 1.00),
    Target("train_s", "ours", "peft-lily", "training step: ours / peft Lily", 0.95),
    Target("inference_s", "ours", "base", "inference forward: ours / base", 1.03, at_sdxl_widths=True),
    Target("file_bytes", "ours", "unique", "file bytes / unique parameter bytes (ours)", 1.01),
    Target("file_bytes", "peft-lily", "unique", "file bytes / unique parameter bytes (peft Lily)", None),
    Target("peak_bytes", "ours", "lora-matched", "peak training memory: ours / peft LoRA (matched)", 1.00),
)
CPU_TWIN = {"train_s": "train_cpu_s", "inference_s": "inference_cpu_s"}


def target_rows(results: Results, full_sdxl: bool = False) -> list[list[str]]:
    """[description, value, CPU-time value, bound, met]; timings are judged on the wall clock."""
    rows = []
    for target in TARGETS:
        for key in ["ours-sample", "ours-batch"] if target.numerator == "ours" else [target.numerator]:
            bottom_key = key if target.denominator == "unique" else target.denominator
            bottom_figure = "unique_bytes" if target.denominator == "unique" else target.figure
            value = ratio(results.get(key, {}).get(target.figure), results.get(bottom_key, {}).get(bottom_figure))
            if value is None:
                continue
            twin = CPU_TWIN.get(target.figure)
            cpu = ratio(results[key].get(twin), results[bottom_key].get(twin)) if twin else None
            bound = "–" if target.limit is None else f"≤ {target.limit:.2f}"
            if target.limit is None:
                met = "–"
            elif target.at_sdxl_widths and not full_sdxl:
                met = "n/a here (judged at SDXL widths, --full-sdxl)"
            else:
                met = "yes" if value <= target.limit else "NO"
            rows.append([target.description.replace("ours", key, 1), fmt(value), fmt(cpu), bound, met])
    return rows


def machine_description(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def iter_tables(results: Results, full_sdxl: bool = False) -> Iterator[tuple[str, str]]:
    yield "Figures (medians; ratios to the base UNet)", absolute_table(results)
    if "ours-sample" in results:
        yield "Ratios: ours (sample routing) to each contender", ratio_table(results)
    headers = ["ratio", "value", "(CPU time)", "target", "met"]
    yield "Targets (timings judged on the wall clock)", format_table(headers, target_rows(results, full_sdxl))


def versions() -> str:
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}"
    )


def markdown(title: str, facts: list[str], tables: dict[str, str], notes: list[str] | None = None) -> str:
    """The results file: a title, a bullet list of facts, the tables, then notes."""
    lines = [f"# {title}", "", *(f"- {fact}" for fact in facts), ""]
    for heading, table in tables.items():
        lines += [f"## {heading}", "", table, ""]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def replace_marked_section(text: str, marker: str, body: str) -> str:
    """`text` with the block between `<!-- marker -->` and `<!-- /marker -->` set to `body` (appended if absent)."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    head, found, rest = text.partition(start)
    if found:
        _, closed, tail = rest.partition(end)
        if not closed:
            raise ValueError(f"{start} has no closing {end}")
        return head + block + tail
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def marked_section(text: str, marker: str) -> str | None:
    """The whole `<!-- marker -->` ... `<!-- /marker -->` block of `text`, markers included, or None."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    _, found, rest = text.partition(start)
    body, closed, _ = rest.partition(end)
    return start + body + end if found and closed else None
