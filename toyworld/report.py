"""Tables and plots of the subject-driven benchmark, from per-run records (plain dicts, as in its JSON file).

A record is one training run: `method`, `learning_rate`, `prior`, `seed`, `params`, `scores` (name -> value),
and optionally `subject` (default: the bundled default subject) and `budget_rank` (the LoRA rank whose
parameter count the run's budget matches; default: `params`). Every cell is a mean with its 95% bootstrap
interval and the number of runs `n`; Lily and LoRA are compared on the same (subject, seed) pairs.
Plots are drawn with matplotlib's object API (no display needed) and return what they drew.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import Estimate, bootstrap_mean, paired_comparison
from .subjects import DEFAULT_SUBJECT

Record = Mapping[str, Any]

SCORE_NAMES = {
    "subject": "subject fidelity",
    "similarity": "subject similarity",
    "background_seen": "prompt fidelity, seen backgrounds",
    "background_unseen": "prompt fidelity, unseen background",
    "class_preservation": "class preservation",
}
METHOD_NAMES = {"lily": "Lily", "lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def subject_of(record: Record) -> str:
    return str(record.get("subject", DEFAULT_SUBJECT.name))


def budget_of(record: Record) -> int:
    """The budget a run belongs to: the LoRA rank it matches, else its own parameter count."""
    return int(record.get("budget_rank", record["params"]))


def setting_of(record: Record) -> tuple[str, int, float, bool]:
    """What a row groups by: (method, budget, learning rate, prior preservation); the seeds and subjects vary."""
    return (str(record["method"]), budget_of(record), float(record["learning_rate"]), bool(record["prior"]))


def group_by_setting(records: Sequence[Record]) -> dict[tuple[str, int, float, bool], list[Record]]:
    groups: dict[tuple[str, int, float, bool], list[Record]] = {}
    for record in records:
        groups.setdefault(setting_of(record), []).append(record)
    return groups


def estimate(records: Sequence[Record], metric: str) -> Estimate:
    """Mean and 95% bootstrap interval of one score over runs."""
    return bootstrap_mean([float(r["scores"][metric]) for r in records])


def _table(header: Sequence[str], align: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_table(
    records: Sequence[Record],
    base_scores: Mapping[str, float] | None = None,
    metrics: Sequence[str] = tuple(SCORE_NAMES),
) -> str:
    """Markdown: one row per (method, budget, lr, prior), each score as mean [95% CI] over its runs, and n."""
    header = ["method", "budget (LoRA rank)", "lr", "prior", "params", *(SCORE_NAMES.get(m, m) for m in metrics), "n"]
    align = ["---", "---:", "---:", "---", "---:", *("---:" for _ in metrics), "---:"]
    rows = []
    if base_scores is not None:
        rows.append(["base model (no training)", "", "", "", "0", *(f"{base_scores[m]:.3f}" for m in metrics), ""])
    for (method, budget, learning_rate, prior), group in group_by_setting(records).items():
        params = sorted({int(r["params"]) for r in group})
        rows.append(
            [
                method_name(method),
                str(budget),
                f"{learning_rate:g}",
                "on" if prior else "off",
                "/".join(f"{p:,}" for p in params),
                *(str(estimate(group, metric)) for metric in metrics),
                str(len(group)),
            ]
        )
    return _table(header, align, rows)


def per_subject_tables(
    records: Sequence[Record],
    base_scores: Mapping[str, Mapping[str, float]] | None = None,
    metrics: Sequence[str] = tuple(SCORE_NAMES),
) -> str:
    """One `summary_table` per subject, under a '### subject <name>' heading; `base_scores` by subject name."""
    subjects = list(dict.fromkeys(subject_of(r) for r in records))
    parts = []
    for subject in subjects:
        base = None if base_scores is None else base_scores.get(subject)
        rows = [r for r in records if subject_of(r) == subject]
        parts.append(f"### subject {subject}\n\n{summary_table(rows, base, metrics)}")
    return "\n".join(parts)


def best_setting(records: Sequence[Record], method: str, budget: int, metric: str) -> list[Record]:
    """The runs of `method`'s setting (lr, prior) with the highest mean `metric` at `budget`; [] if none."""
    groups = [g for key, g in group_by_setting(records).items() if key[0] == method and key[1] == budget]
    return max(groups, key=lambda g: estimate(g, metric).mean, default=[])


def _setting_label(group: Sequence[Record]) -> str:
    first = group[0]
    params = "/".join(f"{p:,}" for p in sorted({int(r["params"]) for r in group}))
    return f"{method_name(first['method'])} ({params} params, lr {first['learning_rate']:g}, " + (
        "prior)" if first["prior"] else "no prior)"
    )


def paired_lines(records: Sequence[Record], metric: str = "subject", a: str = "lily", b: str = "lora") -> list[str]:
    """Per budget both methods ran at: a - b over (subject, seed) pairs, each method at its best setting there.

    Markdown list items with the mean difference, its paired 95% bootstrap interval, wins/losses/ties and the
    exact sign test's p-value. A budget where the two methods do not share every (subject, seed) pair says so.
    """
    lines = []
    budgets = sorted(
        {budget_of(r) for r in records if r["method"] == a} & {budget_of(r) for r in records if r["method"] == b}
    )
    for budget in budgets:
        group_a, group_b = (best_setting(records, method, budget, metric) for method in (a, b))
        pairs_a = {(subject_of(r), int(r["seed"])): float(r["scores"][metric]) for r in group_a}
        pairs_b = {(subject_of(r), int(r["seed"])): float(r["scores"][metric]) for r in group_b}
        name = SCORE_NAMES.get(metric, metric)
        head = f"- budget of LoRA rank {budget}: {_setting_label(group_a)} − {_setting_label(group_b)}, {name}: "
        try:
            comparison = paired_comparison(pairs_a, pairs_b)
        except ValueError as error:
            lines.append(head + f"not compared ({error})")
            continue
        d = comparison.difference
        interval = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" if d.n > 1 else f"{d.mean:+.3f} (n=1, no interval)"
        lines.append(
            head + f"{interval} over {d.n} (subject, seed) pairs; {method_name(a)} higher in {comparison.wins}, "
            f"lower in {comparison.losses}, tied in {comparison.ties}; sign test p = {comparison.p_value:.3g}"
        )
    return lines


@dataclass(frozen=True)
class PlotData:
    """What a plot function drew, read back from its axes: the file, the labels and each line's points."""

    path: Path
    title: str
    xlabel: str
    ylabel: str
    lines: dict[str, tuple[list[float], list[float]]]


def _save(figure: Any, axes: Any, path: Path) -> PlotData:
    axes.legend()
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    # labelled lines, and error-bar plots (whose label is on the container holding the data line)
    labelled = [(line.get_label(), line) for line in axes.get_lines()]
    labelled += [(container.get_label(), container.lines[0]) for container in axes.containers]
    lines = {
        label: ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
        for label, line in labelled
        if label and not label.startswith("_")
    }
    return PlotData(path, axes.get_title(), axes.get_xlabel(), axes.get_ylabel(), lines)


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    return figure, figure.add_subplot()


def plot_quality_vs_params(records: Sequence[Record], path: Path, metric: str = "subject") -> PlotData:
    """Quality vs trainable parameters, one line per method: at each budget its best setting's mean and 95% CI."""
    figure, axes = _figure()
    for method in dict.fromkeys(str(r["method"]) for r in records):
        points = []
        for budget in sorted({budget_of(r) for r in records if r["method"] == method}):
            group = best_setting(records, method, budget, metric)
            points.append((sum(int(r["params"]) for r in group) / len(group), estimate(group, metric)))
        points.sort(key=lambda point: point[0])
        xs, values = [p[0] for p in points], [p[1] for p in points]
        ys = [v.mean for v in values]
        errors = [[v.mean - v.low for v in values], [v.high - v.mean for v in values]]
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method_name(method))
    axes.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 5,000  10,000  20,000 ...
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel(f"{SCORE_NAMES.get(metric, metric)} (mean, 95% CI)")
    axes.set_title(f"{SCORE_NAMES.get(metric, metric).capitalize()} vs adapter size")
    return _save(figure, axes, path)


def load_learning_curve(path: Path) -> list[dict[str, Any]]:
    """Points of a learning-curve JSON: a list, or a dict holding one under "points"; each point has `method`,
    `steps` and `scores` (or the score names at its top level). `ValueError` in one sentence otherwise."""
    data = json.loads(Path(path).read_text())
    points = data.get("points") if isinstance(data, dict) else data
    if not isinstance(points, list) or not all(isinstance(p, dict) and {"method", "steps"} <= set(p) for p in points):
        raise ValueError(
            f"{path} is not a learning curve: expected a list of points with 'method', 'steps' and scores"
        )
    return points


def plot_quality_vs_steps(points: Sequence[Record], path: Path, metric: str = "subject") -> PlotData:
    """Quality vs training steps, one line per method (several points at one step count: their mean)."""
    figure, axes = _figure()
    for method in dict.fromkeys(str(p["method"]) for p in points):
        by_steps: dict[int, list[float]] = {}
        for point in points:
            if point["method"] == method:
                scores = point.get("scores", point)
                by_steps.setdefault(int(point["steps"]), []).append(float(scores[metric]))
        steps = sorted(by_steps)
        axes.plot(steps, [sum(by_steps[s]) / len(by_steps[s]) for s in steps], marker="o", label=method_name(method))
    axes.set_xlabel("training steps")
    axes.set_ylabel(SCORE_NAMES.get(metric, metric))
    axes.set_title(f"{SCORE_NAMES.get(metric, metric).capitalize()} vs training steps")
    return _save(figure, axes, path)
