"""Tables and plots of the subject-driven benchmark on synthetic records whose statistics are known."""

import json

import pytest

from toyworld.report import (
    load_learning_curve,
    paired_lines,
    per_subject_tables,
    plot_quality_vs_params,
    plot_quality_vs_steps,
    summary_table,
)

SUBJECTS = ("star", "square", "triangle", "circle")
PARAMS = {("lora", 1): 8192, ("lora", 4): 32768, ("lily", 1): 8000, ("lily", 4): 32000}


def record(method, budget, subject, seed, subject_score, lr=3e-3, prior=False):
    scores = {
        "subject": subject_score,
        "similarity": 0.5,
        "background_seen": 1.0,
        "background_unseen": 0.5,
        "class_preservation": 0.75,
    }
    return {
        "method": method,
        "learning_rate": lr,
        "prior": prior,
        "seed": seed,
        "steps": 100,
        "params": PARAMS[(method, budget)],
        "budget_rank": budget,
        "subject": subject,
        "scores": scores,
    }


def synthetic():
    """LoRA scores 0.1 * seed + budget / 10; Lily exactly 0.1 more at budget 4 and 0.05 less at budget 1."""
    records = []
    for budget in (1, 4):
        for subject in SUBJECTS:
            for seed in range(3):
                lora = 0.1 * seed + budget / 10
                records.append(record("lora", budget, subject, seed, lora))
                records.append(record("lily", budget, subject, seed, lora + (0.1 if budget == 4 else -0.05)))
    return records


def rows(table):
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:] if line]


def test_summary_table_shows_mean_interval_and_n_per_setting():
    table = summary_table(
        synthetic(),
        base_scores=dict.fromkeys(
            ("subject", "similarity", "background_seen", "background_unseen", "class_preservation"), 0.0
        ),
    )
    header = table.splitlines()[0]
    assert "subject fidelity" in header and "prompt fidelity, unseen background" in header and header.endswith("| n |")
    body = rows(table)
    assert body[0][0] == "base model (no training)"
    assert [(r[0], r[1], r[4], r[-1]) for r in body[1:]] == [
        ("LoRA", "1", "8,192", "12"),
        ("Lily", "1", "8,000", "12"),
        ("LoRA", "4", "32,768", "12"),
        ("Lily", "4", "32,000", "12"),
    ]
    # LoRA at budget 4: 0.4, 0.5, 0.6 on each subject -> mean 0.5, interval inside [0.4, 0.6]
    mean, interval = body[3][5].split(" ", 1)
    low, high = (float(v) for v in interval.strip("[]").split(", "))
    assert float(mean) == pytest.approx(0.5) and 0.4 <= low < 0.5 < high <= 0.6
    assert body[3][6] == "0.500 [0.500, 0.500]"  # a constant score: a zero-width interval


def test_one_run_per_setting_shows_n1_not_an_interval():
    table = summary_table([record("lily", 4, "star", 0, 0.3)])
    assert rows(table)[0][5] == "0.300 (n=1)" and rows(table)[0][-1] == "1"


def test_per_subject_tables():
    text = per_subject_tables(synthetic())
    assert [line for line in text.splitlines() if line.startswith("###")] == [f"### subject {s}" for s in SUBJECTS]
    star = text.split("### subject square")[0]
    assert [r[-1] for r in rows(star.split("\n\n", 1)[1])] == ["3", "3", "3", "3"]


def test_paired_lines_per_budget_with_known_differences():
    lines = paired_lines(synthetic())
    assert len(lines) == 2
    low_budget, high_budget = lines
    assert low_budget.startswith("- budget of LoRA rank 1: Lily (8,000 params, lr 0.003, no prior) − LoRA (8,192")
    assert "-0.050 [-0.050, -0.050] over 12 (subject, seed) pairs" in low_budget
    assert "higher in 0, lower in 12, tied in 0; sign test p = 0.000488" in low_budget  # 2 / 2**12
    assert "+0.100 [+0.100, +0.100] over 12 (subject, seed) pairs" in high_budget
    assert "higher in 12, lower in 0" in high_budget


def test_paired_lines_use_each_methods_best_setting_and_say_when_pairs_are_missing():
    records = synthetic() + [record("lora", 4, s, seed, 0.0, lr=1e-2) for s in SUBJECTS for seed in range(3)]
    assert "LoRA (32,768 params, lr 0.003, no prior)" in paired_lines(records)[1]  # lr 0.01 scores lower
    unpaired = [r for r in synthetic() if not (r["method"] == "lily" and r["seed"] == 2)]
    assert "not compared (paired comparison needs the same pairs" in paired_lines(unpaired)[0]


def test_quality_vs_params_plot(tmp_path):
    plot = plot_quality_vs_params(synthetic(), tmp_path / "params.png")
    assert plot.path.stat().st_size > 1000
    assert plot.xlabel == "trainable parameters" and plot.ylabel == "subject fidelity (mean, 95% CI)"
    assert plot.title == "Subject fidelity vs adapter size"
    assert plot.lines["LoRA"] == ([8192, 32768], pytest.approx([0.2, 0.5]))
    assert plot.lines["Lily"] == ([8000, 32000], pytest.approx([0.15, 0.6]))


def test_quality_vs_steps_plot_from_a_learning_curve_file(tmp_path):
    points = [
        {"method": m, "steps": s, "seed": seed, "scores": {"subject": s / 1000 + (0.1 if m == "lily" else 0) + seed}}
        for m in ("lora", "lily")
        for s in (150, 300, 600)
        for seed in (0, 1)
    ]
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"points": points}))
    plot = plot_quality_vs_steps(load_learning_curve(path), tmp_path / "steps.png")
    assert plot.path.stat().st_size > 1000
    assert (plot.xlabel, plot.ylabel) == ("training steps", "subject fidelity")
    assert plot.lines["LoRA"] == ([150, 300, 600], pytest.approx([0.65, 0.8, 1.1]))
    assert plot.lines["Lily"] == ([150, 300, 600], pytest.approx([0.75, 0.9, 1.2]))


def test_a_file_that_is_not_a_learning_curve_is_refused(tmp_path):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"points": [{"method": "lily"}]}))
    with pytest.raises(ValueError, match="not a learning curve"):
        load_learning_curve(path)
