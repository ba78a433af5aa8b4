"""benchmarks/subject_driven.py: the plans it makes (without training), and end to end in its smallest form:
parallel runs, the headline, paired and per-subject tables, the plot, a subject's grid, resuming."""

import json
import re
import shlex

import pytest
from PIL import Image

from benchmarks import subject_driven
from toyworld.compare_jobs import make_jobs
from toyworld.methods import METHODS
from toyworld.runner import write_cached
from toyworld.subjects import SUBJECTS

SCORE_HEADERS = [
    "subject fidelity",
    "subject similarity",
    "prompt fidelity, seen backgrounds",
    "prompt fidelity, unseen background",
    "class preservation",
]


def test_full_plan_is_every_method_budget_subject_and_seed():
    methods = ["lily", "lora", "dora", "lokr", "loha"]
    runs = subject_driven.full_plan(methods)
    budgets = sum(len(METHODS[m].budgets) for m in methods)
    assert budgets == 3 + 4 + 1 + 1 + 1  # the "about 10 adapter settings"
    assert len(runs) == budgets * len(SUBJECTS) * len(subject_driven.SEEDS) == 120
    assert len({r.name for r in runs}) == len(runs)  # one folder and one cache entry each
    assert {r.budget for r in runs if r.method == "lily"} == {1, 2, 4}
    assert {r.budget for r in runs if r.method == "lora"} == {1, 2, 4, 8}
    assert {r.budget for r in runs if r.method in ("dora", "lokr", "loha")} == {4}
    assert {r.subject for r in runs} == set(SUBJECTS) and {r.seed for r in runs} == {0, 1, 2}
    # with the optional budgets: Lily at 2x too, at its own rate there
    extended = subject_driven.full_plan(methods, optional_budgets=True)
    assert len(extended) == 132 and set(runs) < set(extended)
    assert {(r.method, r.budget) for r in extended} - {(r.method, r.budget) for r in runs} == {("lily", 8)}
    lily = subject_driven.RECIPE["lily"]
    assert {(r.budget, r.learning_rate) for r in extended if r.method == "lily"} == {
        *((b, lily.learning_rate) for b in (1, 2, 4)),
        (8, lily.learning_rate_at(8)),
    }
    assert lily.learning_rate_at(8) == lily.learning_rate / 2  # r 14 at 2x, r 7 at 1x: the same lr x r
    # interrupted anywhere, what finished is the most comparable: the rank-4 budget's seed 0 for every method and
    # subject first, then its seed 1, ...; the other budgets after it
    first = runs[: len(methods) * len(SUBJECTS)]
    assert {(r.method, r.subject) for r in first} == {(m, s) for m in methods for s in SUBJECTS}
    assert {(r.budget, r.seed) for r in first} == {(4, 0)}
    assert [r.budget for r in runs].index(1) == 5 * len(SUBJECTS) * 3
    recipe = subject_driven.RECIPE["lora"]
    lora = next(r for r in runs if r.method == "lora")
    assert (lora.steps, lora.learning_rate, lora.extra_flags, lora.prior) == (
        recipe.steps,
        recipe.learning_rate,
        recipe.flags,
        recipe.prior,
    )
    # the default plan holds only the methods the training script can train
    default = subject_driven.plan_of(subject_driven.parse_args([]))
    assert {r.method for r in default} == set(list(METHODS))
    assert len(default) == sum(len(METHODS[m].budgets) for m in list(METHODS)) * len(SUBJECTS) * 3
    assert len(subject_driven.plan_of(subject_driven.parse_args(["--optional_budgets"]))) == len(extended)


@pytest.mark.parametrize("mode", ["--quick", "--lr_sweep"])
def test_optional_budgets_are_refused_outside_the_full_run(mode, capsys):
    with pytest.raises(SystemExit):
        subject_driven.parse_args([mode, "--optional_budgets"])
    assert "--optional_budgets is for the full run" in capsys.readouterr().err


def test_quick_and_lr_sweep_plans():
    quick = subject_driven.plan_of(subject_driven.parse_args(["--quick"]))
    assert [(r.method, r.budget, r.subject, r.seed, r.steps) for r in quick] == [
        ("lily", 4, "star", 0, subject_driven.QUICK_STEPS),
        ("lora", 4, "star", 0, subject_driven.QUICK_STEPS),
    ]
    sweep = subject_driven.plan_of(
        subject_driven.parse_args(["--lr_sweep", "--methods", "lily", "lora", "--learning_rates", "1e-3", "5e-3"])
    )
    assert [(r.method, r.learning_rate, r.budget, r.subject, r.seed) for r in sweep] == [
        ("lily", 1e-3, 4, "star", 0),
        ("lily", 5e-3, 4, "star", 0),
        ("lora", 1e-3, 4, "star", 0),
        ("lora", 5e-3, 4, "star", 0),
    ]
    default_sweep = subject_driven.plan_of(subject_driven.parse_args(["--lr_sweep"]))
    assert len(default_sweep) == len(list(METHODS)) * len(subject_driven.LR_SWEEP_RATES)


@pytest.mark.parametrize("mode", [["--quick"], ["--lr_sweep"], []])
def test_lr_scheduler_replaces_the_recipes_schedule_in_every_plan(mode):
    recipe = subject_driven.plan_of(subject_driven.parse_args(mode))
    constant = subject_driven.plan_of(subject_driven.parse_args([*mode, "--lr_scheduler", "constant"]))
    assert [(r.method, r.learning_rate, r.budget, r.subject, r.seed, r.steps) for r in constant] == [
        (r.method, r.learning_rate, r.budget, r.subject, r.seed, r.steps) for r in recipe
    ]
    assert {r.schedule for r in recipe} == {"cosine"} and {r.schedule for r in constant} == {"constant"}
    assert all(
        [f for f in r.extra_flags if f.startswith("--lr_scheduler")] == ["--lr_scheduler=constant"] for r in constant
    )
    assert all("--cache_latents" in r.extra_flags for r in constant)  # the rest of the recipe is kept
    assert not {r.name for r in constant} & {r.name for r in recipe}  # their own folders and cache entries


def test_prior_replaces_the_recipes_prior_preservation_in_every_plan():
    recipe = subject_driven.plan_of(subject_driven.parse_args(["--methods", "lora", "lily"]))
    for setting, wanted in (("on", True), ("off", False)):
        plan = subject_driven.plan_of(subject_driven.parse_args(["--methods", "lora", "lily", "--prior", setting]))
        assert [(r.method, r.learning_rate, r.budget, r.subject, r.seed) for r in plan] == [
            (r.method, r.learning_rate, r.budget, r.subject, r.seed) for r in recipe
        ]
        assert {r.prior for r in plan} == {wanted}
        assert all(("-prior-" if wanted else "-noprior-") in r.name for r in plan)
    assert {r.prior for r in recipe} == {False}  # no recipe has it (in the lr sweep it cost every method the subject)


def test_prior_both_sweeps_each_learning_rate_with_and_without_prior_and_picks_the_best_pair():
    args = subject_driven.parse_args(
        ["--lr_sweep", "--methods", "lora", "--learning_rates", "1e-3", "2e-3", "--prior", "both"]
    )
    plan = subject_driven.plan_of(args)
    assert [(r.learning_rate, r.prior) for r in plan] == [(1e-3, False), (1e-3, True), (2e-3, False), (2e-3, True)]
    assert len({r.name for r in plan}) == 4  # each its own folder and cache entry
    records = [sweep_record("lora", lr, score) for lr, score in ((1e-3, 0.5), (2e-3, 0.6))]
    records.append({**sweep_record("lora", 1e-3, 0.85), "prior": True})
    best = section(
        subject_driven.render_report(args, records, {}, subject_driven.EvalPlan(), []), "Best learning rate per method"
    )
    assert "- LoRA: lr 0.001, prior preservation (subject fidelity 0.850 (n=1)" in best


def section(report, heading):
    """The text under a '## heading' up to the next '## '."""
    return report.split(f"## {heading}\n\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    parse = lambda line: [cell.strip() for cell in line.strip("|").split("|")]  # noqa: E731
    return parse(lines[0]), [parse(line) for line in lines[2:]]


def test_finished_seconds_are_the_cached_runs_own(tmp_path):
    specs = subject_driven.plan_of(subject_driven.parse_args(["--quick"]))
    plan = subject_driven.EvalPlan(seeds=(0,))
    base, lily, lora = make_jobs(specs, tmp_path, plan)
    cache = tmp_path / "scores"
    assert subject_driven.finished_seconds(specs, tmp_path, plan) == {}
    write_cached(base, cache, {"scores": {}}, 5.0)  # the base model's job is no run
    write_cached(lily, cache, {"scores": {}}, 123.25)
    lora.cache_file(cache).write_text("{half a file")  # unreadable: not finished
    assert subject_driven.finished_seconds(specs, tmp_path, plan) == {lily.name: 123.25}
    # another plan's settings are other jobs: this cache holds none of them
    assert subject_driven.finished_seconds(specs, tmp_path, subject_driven.EvalPlan(seeds=(0, 1))) == {}


def cell_value(cell):
    """'0.512 [0.401, 0.623]' or '0.300 (n=1)' -> 0.512 / 0.3."""
    return float(cell.split()[0])


def test_quick_benchmark_runs_in_parallel_writes_its_tables_and_resumes(tmp_path):
    work_dir, results, grids = tmp_path / "runs", tmp_path / "out" / "subject_driven.md", tmp_path / "grids"
    flags = ["--quick", "--steps", "3", "--inference_steps", "2", "--jobs", "2", "--work_dir", str(work_dir)]
    report = subject_driven.main([*flags, "--results", str(results), "--grids", str(grids)])

    header, rows = table_rows(section(report, "Headline"))
    assert header[:3] == ["method", "smallest budget learning the subject (all subjects)", "per subject"]
    assert [row[0] for row in rows] == ["Lily", "LoRA"]
    for row in rows:
        assert row[1] in ("none", "LoRA r4 (1x)") and row[2] in ("star: none", "star: r4") and row[-1] == "1"
        assert all(0.0 <= cell_value(cell) <= 1.0 for cell in row[3:-1])

    header, rows = table_rows(section(report, "All runs"))
    assert header == ["method", "budget (LoRA rank)", "lr", "prior", "params", *SCORE_HEADERS, "n"]
    assert [row[0] for row in rows] == ["Lily", "LoRA"]
    for row, method in zip(rows, ("lily", "lora"), strict=True):
        recipe = subject_driven.RECIPE[method]
        assert row[1:4] == ["4", f"{recipe.learning_rate:g}", "on" if recipe.prior else "off"] and row[-1] == "1"
        values = [cell_value(cell) for cell in row[5:-1]]
        assert all("(n=1)" in cell for cell in row[5:-1])  # one run: no interval, no "± 0.000"
        assert -1.0 <= values[1] <= 1.0  # similarity is a cosine
        assert all(0.0 <= v <= 1.0 for i, v in enumerate(values) if i != 1)  # the others are fractions
    # LoRA r4 on the workbench's 48 layers; Lily r 7 (stride_A 4, num_B 4) is the largest within it
    assert int(rows[0][4].replace(",", "")) == 68544 and int(rows[1][4].replace(",", "")) == 69632

    paired = section(report, "Lily vs LoRA, paired over (subject, seed)")
    lily, lora = (subject_driven.RECIPE[m] for m in ("lily", "lora"))
    lily_prior, lora_prior = ("prior" if recipe.prior else "no prior" for recipe in (lily, lora))
    assert (
        f"- budget of LoRA rank 4: Lily (68,544 params, lr {lily.learning_rate:g}, {lily_prior})"
        f" − LoRA (69,632 params, lr {lora.learning_rate:g}, {lora_prior})"
    ) in paired
    assert "subject fidelity: " in paired and "prompt fidelity, unseen background: " in paired
    assert paired.count("sign test p = ") == 2
    assert table_rows(section(report, "Adapter sizes"))[1] == [
        ["Lily", "LoRA r4 (1x)", "r 7, stride_A 4, num_B 4", "68,544"]
    ]
    layers = "`to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`, `proj_in`, `proj_out`"
    assert f"Every adapter trains the UNet's {layers} layers" in report
    per_subject = section(report, "Per subject")
    assert "### subject star" in per_subject and "| base model (no training) |" in per_subject
    assert "2 of 2 planned runs finished, 0 of them by earlier invocations" in report and "Partial" not in report
    assert "with one torch thread, sums to " in report and "python -m benchmarks.subject_driven" in report

    assert results.read_text() == report
    data = json.loads(results.with_suffix(".json").read_text())
    assert [(r["method"], r["subject"], r["budget_rank"]) for r in data["runs"]] == [
        ("lily", "star", 4),
        ("lora", "star", 4),
    ]
    assert list(data["base_model"]) == ["star"]
    assert (results.parent / "subject_driven_params.png").stat().st_size > 1000
    grid = Image.open(grids / "subject_driven_grid_star.png")
    assert grid.width > 4 * 64 and grid.height > 3 * 2 * 64  # target, base, Lily, LoRA; 3 prompts x 2 seeds
    assert "![subject_driven_grid_star](../grids/subject_driven_grid_star.png)" in report
    assert len(list((work_dir / "scores").glob("*.json"))) == 3  # the base model and the two runs

    # a second start with the same work_dir is refused without --resume, and with it reuses every score
    with pytest.raises(SystemExit):
        subject_driven.main([*flags, "--results", str(results)])
    lily_run = subject_driven.quick_plan("star", 3)[0].name  # star-lily-budget4-lr0.006-cosine-noprior-seed0
    adapter = next((work_dir / lily_run).glob("*.safetensors"))
    trained_at = adapter.stat().st_mtime_ns
    again = subject_driven.main([*flags, "--resume", "--results", str(tmp_path / "again.md")])
    assert adapter.stat().st_mtime_ns == trained_at  # not trained again
    assert section(again, "All runs") == section(report, "All runs")
    assert "2 of 2 planned runs finished, 2 of them by earlier invocations" in again

    # --report_only trains nothing: with LoRA's score gone, the report is marked partial and holds Lily alone
    next((work_dir / "scores").glob("star-lora-*.json")).unlink()
    partial = subject_driven.main([*flags, "--report_only", "--results", str(tmp_path / "partial.md")])
    assert "> **Partial: 1 of 2 planned runs have finished.**" in partial
    assert "Missing runs: LoRA at LoRA r4 (1x): 1." in partial
    again = shlex.join(
        ["python", "-m", "benchmarks.subject_driven", *flags, "--results", str(tmp_path / "partial.md")]
    )
    assert f"`{again} --resume` trains only the missing ones" in partial
    assert [row[0] for row in table_rows(section(partial, "All runs"))[1]] == ["Lily"]
    assert not list((work_dir / "scores").glob("star-lora-*.json"))

    # --rescore scores the saved adapters with another plan (3 denoising steps), training nothing; each run's
    # training time and the command that trained them come from the first run's JSON
    trained = json.loads(results.with_suffix(".json").read_text())
    rescored = tmp_path / "rescored.md"
    rescore = ["--quick", "--steps", "3", "--inference_steps", "3", "--jobs", "2", "--work_dir", str(work_dir)]
    text = subject_driven.main([*rescore, "--rescore", str(results.with_suffix(".json")), "--results", str(rescored)])
    assert adapter.stat().st_mtime_ns == trained_at  # not trained again
    data = json.loads(rescored.with_suffix(".json").read_text())
    assert (data["plan"]["steps"], trained["plan"]["steps"]) == (3, 2)
    assert data["trainings"] == trained["trainings"] and "--quick" in trained["trainings"]["command"]
    kept = ("name", "train_seconds", "file_bytes", "params")
    assert [[r[k] for k in kept] for r in data["runs"]] == [[r[k] for k in kept] for r in trained["runs"]]
    assert [r["scores"] for r in data["runs"]] != [r["scores"] for r in trained["runs"]]  # other images
    assert all(0.0 <= r["scores"]["subject"] <= 1.0 for r in data["runs"])
    assert f"trained by `{trained['trainings']['command']}`" in text and "Trained nothing" in text
    # refused before any work: a results file that did not train every planned run, a missing adapter
    with pytest.raises(SystemExit, match=r"did not train 1 planned run\(s\): star-lora-"):
        subject_driven.main([*rescore, "--rescore", str(tmp_path / "partial.json"), "--results", str(rescored)])
    (tmp_path / "old.json").write_text(json.dumps({k: v for k, v in trained.items() if k != "trainings"}))
    with pytest.raises(SystemExit, match="is not a results file that records what trained its runs"):
        subject_driven.main([*rescore, "--rescore", str(tmp_path / "old.json"), "--results", str(rescored)])
    partial_trainings = {**trained, "trainings": {k: v for k, v in trained["trainings"].items() if k != "machine"}}
    (tmp_path / "old.json").write_text(json.dumps(partial_trainings))
    with pytest.raises(SystemExit, match="trainings lacks machine"):
        subject_driven.main([*rescore, "--rescore", str(tmp_path / "old.json"), "--results", str(rescored)])
    adapter.rename(adapter.with_suffix(".moved"))
    with pytest.raises(SystemExit, match=rf"{work_dir} lacks the adapter of 1 planned run\(s\): {lily_run}"):
        subject_driven.main([*rescore, "--rescore", str(results.with_suffix(".json")), "--results", str(rescored)])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume"], "--resume needs --work_dir"),
        (["--report_only"], "--report_only needs --work_dir"),
        (["--rescore", "results.json"], "--rescore needs --work_dir"),
        (["--rescore", "no/such.json", "--work_dir", "runs"], "--rescore no/such.json is not a file"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--lr_scheduler", "exponential"], "--lr_scheduler: invalid choice"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--inference_steps", "0"], "--inference_steps must be at least 1"),
        (["--learning_curve", "no/such/curve.json"], "is not a file"),
        (["--subject", "star"], "--subject is for --quick and --lr_sweep"),
        (["--learning_rates", "1e-3"], "--learning_rates is for --lr_sweep"),
        (["--lr_sweep", "--learning_rates", "0"], "--learning_rates must be positive"),
        (["--quick", "--lr_sweep"], "not allowed with argument"),
        (["--quick", "--methods", "lily"], "--methods is not for --quick"),
        (["--methods", "ia3"], "--methods ia3: unknown"),
    ],
)
def test_bad_flags_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        subject_driven.parse_args(flags)
    assert exit_info.value.code == 2
    assert re.search(re.escape(message), capsys.readouterr().err)


def sweep_record(method, lr, subject_score):
    return {
        "method": method,
        "learning_rate": lr,
        "prior": False,
        "seed": 0,
        "steps": 2400,
        "subject": "star",
        "budget_rank": 4,
        "extra_flags": ["--lr_scheduler=cosine"],
        "params": 32000,
        "scores": {
            "subject": subject_score,
            "similarity": 0.5,
            "background": 1.0,
            "background_seen": 1.0,
            "background_unseen": 1.0,
            "class_preservation": 0.5,
        },
    }


def test_lr_sweep_report_names_each_methods_best_learning_rate():
    records = [sweep_record("lily", 1e-3, 0.2), sweep_record("lily", 3e-3, 0.9), sweep_record("lora", 1e-3, 0.7)]
    args = subject_driven.parse_args(["--lr_sweep"])
    report = subject_driven.render_report(args, records, {}, subject_driven.EvalPlan(), [])
    assert report.startswith("# Learning-rate sweep: each method at the LoRA r4 (1x) budget on star")
    assert "- Lily: budgets r4; 2400 steps, lr 0.001, 0.003, no prior; `--lr_scheduler=cosine`" in report
    best = section(report, "Best learning rate per method")
    assert "then fixed in `RECIPE`" in best
    assert (
        "- Lily: lr 0.003, no prior (subject fidelity 0.900 (n=1)" in best and "- LoRA: lr 0.001, no prior (" in best
    )
    assert "progress to the target 1.11)" in best and "min(subject fidelity / 0.8, prompt fidelity / 0.9)" in best
