"""Tables and plots of the subject-driven benchmark on synthetic records whose statistics are known."""

import json

import pytest

from toyworld.report import (
    adapter_settings_table,
    best_setting,
    common_budget,
    grid_runs,
    headline_table,
    load_learning_curve,
    paired_lines,
    per_subject_tables,
    plot_quality_vs_params,
    plot_quality_vs_steps,
    smallest_reaching_budget,
    summary_table,
    target_progress,
)

SUBJECTS = ("star", "square", "triangle", "circle")
PARAMS = {
    ("lora", 1): 8192,
    ("lora", 2): 16384,
    ("lora", 4): 32768,
    ("lora", 8): 65536,
    ("lily", 1): 8000,
    ("lily", 2): 16000,
    ("lily", 4): 32000,
    ("lokr", 4): 30000,
}


def record(method, budget, subject, seed, subject_score, lr=3e-3, prior=False, background=1.0, similarity=0.5):
    scores = {
        "subject": subject_score,
        "similarity": similarity,
        "background": background,
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


def sweep():
    """LoRA at ranks 1, 2, 4, 8 with subject fidelity 0.2 * rank - 0.1 * seed (mean over seeds 0-2: 0.1, 0.3, 0.7,
    1.5); Lily at budgets 1, 2, 4 with 0.85 from budget 2 on, 0.5 below; LoKr at budget 4 with 0.9 but prompt
    fidelity 0.5. Square: Lily reaches only at budget 4."""
    records = []
    for subject in ("star", "square"):
        for seed in range(3):
            for budget in (1, 2, 4, 8):
                records.append(record("lora", budget, subject, seed, min(1.0, 0.2 * budget - 0.1 * seed)))
            for budget in (1, 2, 4):
                reached = budget >= (2 if subject == "star" else 4)
                records.append(record("lily", budget, subject, seed, 0.85 if reached else 0.5))
            records.append(record("lokr", 4, subject, seed, 0.9, background=0.5))
    return records


def test_smallest_budget_reaching_the_subject():
    records = sweep()
    # LoRA's mean over (subject, seed) at rank 4: 0.8 - 0.1 = 0.7 < 0.8; at rank 8 it is 1.0 - 0.1 * mean(...)
    assert smallest_reaching_budget(records, "lora") == 8
    assert smallest_reaching_budget(records, "lily", "star") == 2  # reaches 0.8 only from budget 2 on
    assert smallest_reaching_budget(records, "lily", "square") == 4
    assert smallest_reaching_budget(records, "lily") == 4  # over both subjects: 0.675 at budget 2
    assert smallest_reaching_budget(records, "lokr") is None  # subject 0.9 but prompt fidelity 0.5
    assert common_budget(records) == 4
    assert common_budget([r for r in records if r["budget_rank"] != 4]) == 2  # no LoKr left; Lily and LoRA share 1, 2
    assert common_budget([r for r in records if r["method"] == "lokr" or r["budget_rank"] == 1]) is None


def test_headline_table_per_method():
    table = headline_table(sweep())
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header == [
        "method",
        "smallest budget learning the subject (all subjects)",
        "per subject",
        "subject fidelity at LoRA r4 (1x)",
        "prompt fidelity, unseen background at LoRA r4 (1x)",
        "class preservation at LoRA r4 (1x)",
        "n",
    ]
    body = {row[0]: row for row in rows(table)}
    assert body["LoRA"][1:3] == ["LoRA r8 (2x)", "star: r8, square: r8"]
    assert body["Lily"][1:3] == ["LoRA r4 (1x)", "star: r2, square: r4"]
    assert body["LoKr"][1:3] == ["none", "star: none, square: none"]
    assert body["Lily"][3] == "0.850 [0.850, 0.850]" and body["Lily"][-1] == "6"
    lora_mean = float(body["LoRA"][3].split()[0])
    assert lora_mean == pytest.approx(0.7)  # 0.8 - 0.1 * seed, seeds 0-2


def test_adapter_settings_are_tabulated_from_the_records():
    records = [
        {**record("lily", 1, "star", 0, 0.1), "adapter": {"r": 5, "stride_A": 8, "num_B": 2}},
        {**record("lily", 4, "star", 0, 0.1), "adapter": {"r": 10, "stride_A": 4, "num_B": 4}},
        {**record("lora", 4, "star", 0, 0.1), "adapter": {}},
    ]
    assert rows(adapter_settings_table(records)) == [
        ["Lily", "LoRA r1 (1/4x)", "r 5, stride_A 8, num_B 2", "8,000"],
        ["Lily", "LoRA r4 (1x)", "r 10, stride_A 4, num_B 4", "32,000"],
    ]
    assert adapter_settings_table(records[2:]) == ""


def test_grid_shows_each_method_at_the_smallest_budget_where_one_learns_the_subject():
    records = sweep()
    for r in records:
        r["name"] = f"{r['subject']}-{r['method']}-{r['budget_rank']}-{r['seed']}"
    budget, reached, chosen = grid_runs(records, "star", ["lokr"])
    assert (budget, reached) == (2, True)  # Lily learns star at budget 2
    # LoRA's best star run at budget 2 is seed 0; LoKr did not run at 2, so its closest larger budget, 4
    assert [r["name"] for r in chosen] == ["star-lily-2-0", "star-lora-2-0", "star-lokr-4-0"]
    nobody = [r for r in records if r["method"] != "lily" and r["budget_rank"] != 8]
    budget, reached, chosen = grid_runs(nobody, "square", [])
    assert (budget, reached) == (4, False) and [r["method"] for r in chosen] == ["lora"]


def test_learning_curve_runs_file_becomes_one_line_per_run(tmp_path):
    runs = {
        f"square-{m}": {
            "method": m,
            "subject": "square",
            "learning_rate": 1e-3,
            "points": {str(s): {"scores": {"subject": s / 1000}} for s in (300, 600)},
        }
        for m in ("lily", "lora")
    }
    path = tmp_path / "learning_curves.json"
    path.write_text(json.dumps({"base": {}, "runs": runs}))
    points = load_learning_curve(path)
    assert len(points) == 4 and points[0]["steps"] == 300
    plot = plot_quality_vs_steps(points, tmp_path / "steps.png")
    assert plot.lines["Lily, square, lr 0.001"] == ([300, 600], pytest.approx([0.3, 0.6]))


def test_best_setting_for_the_target_does_not_reward_losing_the_prompt():
    # lr 3e-3 learns the subject better but loses the asked background; lr 1e-3 is closer to meeting both targets
    records = [record("lily", 4, "square", seed, 0.95, lr=3e-3, background=0.6) for seed in (0, 1)] + [
        record("lily", 4, "square", seed, 0.7, lr=1e-3, background=1.0) for seed in (0, 1)
    ]
    assert target_progress(records[:2]) == pytest.approx(0.6 / 0.9)
    assert target_progress(records[2:]) == pytest.approx(0.7 / 0.8)
    assert best_setting(records, "lily", 4, "subject")[0]["learning_rate"] == 3e-3
    assert best_setting(records, "lily", 4, "target")[0]["learning_rate"] == 1e-3
    assert best_setting(records, "lora", 4, "target") == []
    # every rate loses the unseen background alike (DoRA on square): the tie goes to the better subject fidelity
    tied = [
        record("lily", 4, "square", 0, score, lr=lr, background=0.667) for lr, score in ((1e-3, 0.6), (2e-3, 0.84))
    ]
    assert target_progress(tied[:1]) == target_progress(tied[1:])
    assert best_setting(tied, "lily", 4, "target")[0]["learning_rate"] == 2e-3
