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

from .methods import REFERENCE_BUDGET, budget_label, method_name
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
SUBJECT_TARGET, PROMPT_TARGET = 0.8, 0.9  # the subject is learned: subject fidelity >= 0.8, prompt fidelity >= 0.9
PROMPT_METRIC = "background"  # prompt fidelity over all three backgrounds (seen and unseen)


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


def target_progress(records: Sequence[Record]) -> float:
    """How close runs come to learning the subject: min(mean subject fidelity / SUBJECT_TARGET, mean prompt
    fidelity / PROMPT_TARGET); at least 1 when both targets are met. A setting that learns the subject by losing
    the prompt ranks by its prompt fidelity, not by its subject fidelity."""
    subject = estimate(records, "subject").mean / SUBJECT_TARGET
    return min(subject, estimate(records, PROMPT_METRIC).mean / PROMPT_TARGET)


def best_setting(records: Sequence[Record], method: str, budget: int, metric: str) -> list[Record]:
    """The runs of `method`'s setting (lr, prior) with the highest mean `metric` at `budget` (metric "target":
    the highest `target_progress`, ties broken by subject fidelity); [] if none."""
    groups = [g for key, g in group_by_setting(records).items() if key[0] == method and key[1] == budget]
    if metric == "target":
        return max(groups, key=lambda g: (target_progress(g), estimate(g, "subject").mean), default=[])
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


def reaches_subject(group: Sequence[Record]) -> bool:
    """Whether runs learned the subject: mean subject fidelity >= 0.8 and mean prompt fidelity (all backgrounds)
    >= 0.9."""
    return bool(group) and (
        estimate(group, "subject").mean >= SUBJECT_TARGET and estimate(group, PROMPT_METRIC).mean >= PROMPT_TARGET
    )


def smallest_reaching_budget(records: Sequence[Record], method: str, subject: str | None = None) -> int | None:
    """The smallest budget at which a setting of `method` learns the subject (`reaches_subject`), its runs' means
    over every (subject, seed), or over the seeds on `subject` only; None if no budget does."""
    rows = [r for r in records if subject is None or subject_of(r) == subject]
    for budget in sorted({budget_of(r) for r in rows if r["method"] == method}):
        groups = [g for key, g in group_by_setting(rows).items() if key[0] == method and key[1] == budget]
        if any(reaches_subject(group) for group in groups):
            return budget
    return None


def common_budget(records: Sequence[Record]) -> int | None:
    """The budget to compare methods at: the rank-4 budget if every method ran there, else the largest budget every
    method ran at (None if there is none)."""
    methods = dict.fromkeys(str(r["method"]) for r in records)
    shared = (
        set.intersection(*({budget_of(r) for r in records if r["method"] == m} for m in methods)) if methods else set()
    )
    return REFERENCE_BUDGET if REFERENCE_BUDGET in shared else max(shared, default=None)


def headline_table(records: Sequence[Record], budget: int | None = None) -> str:
    """Markdown: per method, the smallest budget that learns the subject (over all subjects, and per subject), then
    its quality at one budget every method ran at (`common_budget` by default): subject fidelity, prompt fidelity
    on the unseen background (recontextualisation), class preservation, each mean [95% CI] at its best setting."""
    budget = common_budget(records) if budget is None else budget
    at = budget_label(budget) if budget is not None else "equal budget"
    metrics = ("subject", "background_unseen", "class_preservation")
    header = [
        "method",
        "smallest budget learning the subject (all subjects)",
        "per subject",
        *(f"{SCORE_NAMES[m]} at {at}" for m in metrics),
        "n",
    ]
    align = ["---", "---", "---", *("---:" for _ in metrics), "---:"]
    subjects = list(dict.fromkeys(subject_of(r) for r in records))
    rows = []
    for method in dict.fromkeys(str(r["method"]) for r in records):
        overall = smallest_reaching_budget(records, method)
        per_subject = []
        for subject in subjects:
            reached = smallest_reaching_budget(records, method, subject)
            per_subject.append(f"{subject}: {'none' if reached is None else f'r{reached}'}")
        group = best_setting(records, method, budget, "subject") if budget is not None else []
        cells = [str(estimate(group, m)) if group else "not run" for m in metrics]
        rows.append(
            [
                method_name(method),
                "none" if overall is None else budget_label(overall),
                ", ".join(per_subject),
                *cells,
                str(len(group)),
            ]
        )
    return _table(header, align, rows)


def adapter_settings_table(records: Sequence[Record]) -> str:
    """Markdown: per (method, budget) with recorded adapter settings (Lily's r, stride_A, num_B, read from the
    saved files), those settings and the parameter count; '' if no record has any."""
    seen: dict[tuple[str, int], tuple[str, str]] = {}
    for record in records:
        settings = record.get("adapter") or {}
        if settings:
            text = ", ".join(f"{key} {value}" for key, value in settings.items())
            seen.setdefault((str(record["method"]), budget_of(record)), (text, f"{int(record['params']):,}"))
    if not seen:
        return ""
    rows = [[method_name(m), budget_label(b), text, params] for (m, b), (text, params) in sorted(seen.items())]
    return _table(["method", "budget", "adapter (from the saved file)", "params"], ["---", "---", "---", "---:"], rows)


def _closest_budget(budgets: Sequence[int], budget: int) -> int:
    """`budget` if present, else the smallest larger one, else the largest."""
    return min((b for b in budgets if b >= budget), default=max(budgets))


def grid_runs(records: Sequence[Record], subject: str, others: Sequence[str]) -> tuple[int, bool, list[Record]]:
    """What a subject's grid shows: (budget, whether a method learns the subject there, the runs).

    The budget is the smallest at which any method learns `subject` (else the comparison budget); the runs are
    the best (subject fidelity + similarity) of Lily, of LoRA and of the `others` together on `subject`, each at
    that budget or, for a method not run there, at its closest (`_closest_budget`). A method without runs is left
    out.
    """
    rows = [r for r in records if subject_of(r) == subject]
    reached = [b for m in dict.fromkeys(str(r["method"]) for r in rows) if (b := smallest_reaching_budget(rows, m))]
    budget = min(reached) if reached else (common_budget(rows) or REFERENCE_BUDGET)
    chosen = []
    for methods in (("lily",), ("lora",), tuple(others)):
        candidates = []
        for method in methods:
            own = [r for r in rows if r["method"] == method]
            if own:
                at = _closest_budget(sorted({budget_of(r) for r in own}), budget)
                candidates += [r for r in own if budget_of(r) == at]
        if candidates:
            chosen.append(
                max(candidates, key=lambda r: float(r["scores"]["subject"]) + float(r["scores"]["similarity"]))
            )
    return budget, bool(reached), chosen


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


def curve_points(data: Any) -> Any:
    """The points of a learning-curve file's data: a list of points, a dict holding one under "points", or
    `benchmarks.learning_curve`'s records (runs with points by step), flattened to one point per (run, step)."""
    if isinstance(data, dict) and isinstance(data.get("runs"), dict):
        return [
            {
                "method": run.get("method"),
                "subject": run.get("subject"),
                "learning_rate": run.get("learning_rate"),
                "steps": int(step),
                "scores": point.get("scores", {}),
            }
            for run in data["runs"].values()
            if isinstance(run, dict) and isinstance(run.get("points"), dict)
            for step, point in run["points"].items()
        ]
    return data.get("points") if isinstance(data, dict) else data


def load_learning_curve(path: Path) -> list[dict[str, Any]]:
    """Points of a learning-curve JSON (see `curve_points`); each point has `method`, `steps` and `scores` (or the
    score names at its top level). `ValueError` in one sentence otherwise."""
    points = curve_points(json.loads(Path(path).read_text()))
    if not isinstance(points, list) or not all(isinstance(p, dict) and {"method", "steps"} <= set(p) for p in points):
        raise ValueError(
            f"{path} is not a learning curve: expected a list of points with 'method', 'steps' and scores"
        )
    return points


def curve_label(point: Record) -> str:
    """A learning-curve line's label: 'LoRA, square, lr 0.001' (the method alone when the point says no more)."""
    parts = [method_name(str(point["method"]))]
    if point.get("subject"):
        parts.append(str(point["subject"]))
    if point.get("learning_rate") is not None:
        parts.append(f"lr {float(point['learning_rate']):g}")
    return ", ".join(parts)


def plot_quality_vs_steps(points: Sequence[Record], path: Path, metric: str = "subject") -> PlotData:
    """Quality vs training steps, one line per `curve_label` (method, and subject and lr where the points say
    them; several points at one step count: their mean)."""
    figure, axes = _figure()
    for label in dict.fromkeys(curve_label(p) for p in points):
        by_steps: dict[int, list[float]] = {}
        for point in points:
            if curve_label(point) == label:
                scores = point.get("scores", point)
                by_steps.setdefault(int(point["steps"]), []).append(float(scores[metric]))
        steps = sorted(by_steps)
        axes.plot(steps, [sum(by_steps[s]) / len(by_steps[s]) for s in steps], marker="o", label=label)
    axes.set_xlabel("training steps")
    axes.set_ylabel(SCORE_NAMES.get(metric, metric))
    axes.set_title(f"{SCORE_NAMES.get(metric, metric).capitalize()} vs training steps")
    return _save(figure, axes, path)
