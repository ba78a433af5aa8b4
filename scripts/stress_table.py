"""How the stress cases came out: each case's category, a table of the ones that are not clean, the summary line."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

# Worst first: a case with several problems is counted once, under the worst.
CATEGORIES = ("secret", "lost", "hang", "traceback", "wrong", "clean")
SUMMARY_NAMES = {
    "clean": "clean",
    "traceback": "tracebacks",
    "lost": "lost",
    "hang": "hangs",
    "secret": "secrets",
    "wrong": "wrong",
}


@dataclass(frozen=True)
class Outcome:
    """One case's result: its worst category, what was found, and how long its steps took."""

    name: str
    group: str
    category: str
    note: str
    seconds: float


def worst(categories: Sequence[str]) -> str:
    """The worst of `categories` ("clean" for none)."""
    return min(categories, key=CATEGORIES.index, default="clean")


def summary_line(outcomes: Sequence[Outcome]) -> str:
    """`N tried, N clean, N tracebacks, N lost, N hangs, N secrets, N wrong` (wrong: an input accepted that should
    be refused, a good one refused, a refusal without its one line, a warning missing, a different result)."""
    counts = Counter(outcome.category for outcome in outcomes)
    parts = [f"{len(outcomes)} tried"]
    parts += [
        f"{counts[key]} {SUMMARY_NAMES[key]}" for key in ("clean", "traceback", "lost", "hang", "secret", "wrong")
    ]
    return ", ".join(parts)


def problem_table(outcomes: Sequence[Outcome], width: int = 160) -> str:
    """One line per case that is not clean, worst first: category, group, name, what was found."""
    rows = sorted((o for o in outcomes if o.category != "clean"), key=lambda o: (CATEGORIES.index(o.category), o.name))
    lines = []
    for outcome in rows:
        line = f"{outcome.category:<9} {outcome.group:<9} {outcome.name}: {outcome.note}"
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return "\n".join(lines)


def group_table(outcomes: Sequence[Outcome]) -> str:
    """Per group: how many cases, how many clean, and the slowest case's seconds."""
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.group, []).append(outcome)
    lines = [f"{'group':<10} {'cases':>5} {'clean':>5} {'slowest':>8}"]
    for name, members in groups.items():
        clean = sum(o.category == "clean" for o in members)
        slowest = max(o.seconds for o in members)
        lines.append(f"{name:<10} {len(members):>5} {clean:>5} {slowest:>7.1f}s")
    return "\n".join(lines)
