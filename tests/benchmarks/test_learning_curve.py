"""benchmarks.learning_curve end to end in its smallest form: a few steps, two save points, scored, then extended."""

import json
import os
import re
import time
from pathlib import Path

import pytest

from benchmarks.learning_curve import (
    base_key,
    extension_error,
    first_reached,
    flag_value,
    layers_error,
    main,
    parse_args,
    render_markdown,
    results_footer,
    run_flags,
    run_guidance,
    run_name,
    with_flag,
)
from toyworld.compare import EvalPlan
from toyworld.methods import TARGET_MODULES_FLAG
from toyworld.subjects import SUBJECTS

FLAGS = ["--subject", "square", "--method", "lily", "--save_steps", "2", "4", "--eval_seeds", "1"]


def test_two_save_points_are_scored_tabulated_and_not_redone(tmp_path, monkeypatch):
    results = tmp_path / "curves.md"
    args = [*FLAGS, "--inference_steps", "2", "--work_dir", str(tmp_path / "runs"), "--results", str(results)]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    records = main(args)
    assert os.environ["OMP_NUM_THREADS"] == "1"  # the training it starts uses one thread (two curves side by side)
    name = "square-lily-lr0.003-seed0"
    run = records["runs"][name]
    assert list(run["points"]) == ["2", "4"]
    assert all((tmp_path / "runs" / name / f"checkpoint-{step}").is_dir() for step in (2, 4))
    for point in [
        *(p["scores"] for p in run["points"].values()),
        records["base"][base_key("square", EvalPlan.guidance_scale)],
    ]:
        assert set(point) == {
            "subject",
            "subject_white",
            "subject_gray",
            "subject_black",
            "similarity",
            "background",
            "background_seen",
            "background_unseen",
            "class_preservation",
        }
        assert all(0.0 <= value <= 1.0 for key, value in point.items() if key != "similarity")
        assert -1.0 <= point["similarity"] <= 1.0  # a cosine similarity
    assert 0 < run["params"] <= 69_632 and run["train_seconds"] > 0  # within LoRA r4 on the 48 layers
    assert json.loads(results.with_suffix(".json").read_text()) == records

    text = results.read_text()
    assert f"| {name} | {run['params']:,} | " in text
    assert f"## {name}" in text and "python -m benchmarks.learning_curve --subject square" in text
    assert "| step | subject fidelity | subject similarity | prompt fidelity, seen | prompt fidelity, unseen |" in text
    assert "| 0 (base model) |" in text and "\n| 2 | " in text and "\n| 4 | " in text
    assert "Training wall time" in text and "machine:" in text

    # a rerun with one more save point resumes from checkpoint-4, scores only step 6 and keeps a hand-written reading
    results.write_text(text + "\n## Reading the curves\n\nhand-written\n")
    weights_time = (tmp_path / "runs" / name / "checkpoint-4").stat().st_mtime_ns
    first_seconds = run["train_seconds"]
    extended = main([*args, "--save_steps", "2", "4", "6"])["runs"][name]
    assert list(extended["points"]) == ["2", "4", "6"]
    assert {step: extended["points"][step] for step in ("2", "4")} == run["points"]
    assert (tmp_path / "runs" / name / "checkpoint-4").stat().st_mtime_ns == weights_time
    assert extended["train_seconds"] > first_seconds and extended["max_steps"] == 6
    assert results.read_text().endswith("## Reading the curves\n\nhand-written\n")
    assert "\n| 6 | " in results.read_text()

    with pytest.raises(SystemExit, match="scored with"):  # other scoring settings would mix two plans in one curve
        main([*args, "--eval_seeds", "2"])


def test_a_run_on_a_schedule_fixed_to_its_horizon_is_not_extended(tmp_path):
    run = tmp_path / "runs" / "square-lily-lr0.003-seed0-lr_scheduler=cosine"
    run.mkdir(parents=True)

    def trained(schedule, horizon):
        (run / "training_args.json").write_text(json.dumps({"lr_scheduler": schedule, "max_train_steps": horizon}))

    trained("cosine", 4)
    assert "trained with the cosine schedule over 4 steps; going on to 6 would splice" in extension_error(run, 6)
    assert extension_error(run, 4) is None  # an interrupted run resumed to its own horizon
    (run / "checkpoint-2").mkdir()
    assert extension_error(run, 2) is None  # an earlier point of the longer run: nothing is trained
    trained("constant", 4)
    assert extension_error(run, 6) is None  # a constant rate is the same schedule at any horizon
    trained("cosine", 4)
    args = [*FLAGS, "--save_steps", "2", "6", "--train_flags=--lr_scheduler=cosine", "--work_dir", str(run.parent)]
    with pytest.raises(SystemExit, match="would splice two schedules"):
        main([*args, "--results", str(tmp_path / "curves.md")])
    assert not (run / "checkpoint-6").exists() and not (tmp_path / "curves.json").exists()


def test_run_names_and_flags():
    assert run_name(parse_args(["--method", "lora", "--lora_alpha", "16"])) == "star-lora-r4-alpha16-lr0.003-seed0"
    assert run_name(parse_args(["--method", "lora", "--lora_alpha", "4"])) == "star-lora-r4-lr0.003-seed0"
    assert run_name(parse_args([])) == "star-lily-lr0.003-seed0"
    loha = parse_args(["--method", "loha", "--rank", "2", "--learning_rate", "8e-3"])
    assert run_name(loha) == "star-loha-budget2-lr0.008-seed0"
    flags = run_flags(loha, Path("/runs/loha"), SUBJECTS["star"])
    assert "--adapter=loha" in flags and "--match_lora_budget=2" in flags and "--learning_rate=0.008" in flags
    assert with_flag(["--a=1", "--b", "--c=3"], "a", 2) == ["--b", "--c=3", "--a=2"]
    assert with_flag(["--b"], "b") == ["--b"]


def test_train_flags_replace_the_benchmarks_own_and_name_the_run(tmp_path):
    assert parse_args(["--train_flags=--lr_scheduler=cosine"]).train_flags == ["--lr_scheduler=cosine"]
    args = parse_args(["--train_flags", "--lr_scheduler=cosine --train_text_encoder"])
    assert run_name(args) == "star-lily-lr0.003-seed0-lr_scheduler=cosine-train_text_encoder"
    flags = run_flags(args, tmp_path / "run", SUBJECTS["star"])
    assert [f for f in flags if f.startswith("--lr_scheduler")] == ["--lr_scheduler=cosine"]
    assert "--train_text_encoder" in flags
    prior = parse_args(["--subject", "square", "--prior"])
    assert run_name(prior) == "square-lily-lr0.003-prior-seed0"
    flags = run_flags(prior, tmp_path / "run", SUBJECTS["square"])
    assert "--with_prior_preservation" in flags and "--class_prompt=a photo of a square" in flags
    assert f"--class_data_dir={tmp_path / 'class-images-square'}" in flags


def test_refusals(capsys):
    cases = {
        "--lora_alpha is a LoRA setting; --method lily has no alpha": ["--method", "lily", "--lora_alpha", "8"],
        "--method loha has no alpha": ["--method", "loha", "--lora_alpha", "8"],
        "must be positive": ["--save_steps", "0"],
        "must be a positive number": ["--learning_rate", "nan"],
        "--train_flags takes flags": ["--train_flags", "cosine"],
        "cannot set --output_dir": ["--train_flags=--lr_scheduler=cosine --output_dir=/tmp/elsewhere"],
    }
    for message, bad in cases.items():
        with pytest.raises(SystemExit):
            parse_args(bad)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error: " in last and message in last


def test_base_scores_at_another_guidance_are_kept_apart():
    assert base_key("star", 5.0) == "star (guidance 5)"
    assert base_key("star", 3.0) == "star (guidance 3)"


def test_a_run_recorded_without_its_guidance_was_scored_at_5_whatever_the_default():
    assert EvalPlan.guidance_scale != 5.0
    assert run_guidance({"points": {}}) == 5.0
    assert run_guidance({"points": {}, "guidance_scale": 3.5}) == 3.5


def test_first_reached_needs_both_targets():
    point = {"subject": 0.85, "background": 0.95}
    assert first_reached({"300": {"subject": 0.9, "background": 0.5}, "600": point}) == 600
    assert first_reached({"300": {"subject": 0.7, "background": 1.0}}) is None


def test_a_run_named_by_a_regex_keeps_its_summary_row_whole_and_the_file_names_its_json():
    scores = {"subject": 0.5, "similarity": 0.4, "background_seen": 1.0, "background_unseen": 1.0}
    run = {
        "points": {"600": {"scores": {**scores, "class_preservation": 0.5}, "score_seconds": 5.0}},
        "subject": "star",
        "learning_rate": 1e-3,
        "max_steps": 600,
        "params": 1000,
        "eval_seeds": 4,
        "inference_steps": 20,
        "machine": "x",
        "command": "python -m benchmarks.learning_curve",
    }
    name = "star-lora-r4-lr0.001-seed0-target_modules=.*(to_q|to_v)$"
    text = render_markdown({"base": {}, "runs": {name: run}}, "learning_curves_recipe.json")
    row = next(line for line in text.splitlines() if line.startswith("| star-lora"))
    cells = [cell for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert len(cells) == 5 and cells[1].strip() == "1,000" and cells[2].strip() == "0.500 (600)"
    assert "Regenerated from `learning_curves_recipe.json`" in text


def test_results_footer_names_the_command_machine_and_wall_time():
    started = time.perf_counter() - 90
    footer = results_footer("benchmarks.eval_noise", ["--runs", "a b"], started, "cpu", "1 of 2 trained")
    assert footer.splitlines() == [
        "Command: `python -m benchmarks.eval_noise --runs 'a b'`  ",
        "Machine: cpu  ",
        "Wall time: 1.5 min; 1 of 2 trained",
    ]


def test_a_run_trained_or_scored_on_other_layers_is_not_continued(tmp_path):
    """The run's name does not say which layers it adapted: a folder or scores from other layers are refused."""
    name = "square-lily-lr0.003-seed0"
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    flags = run_flags(parse_args([*FLAGS, "--work_dir", str(tmp_path / "runs")]), run, SUBJECTS["square"])
    ours = flag_value(flags, "target_modules")
    assert ours == TARGET_MODULES_FLAG.partition("=")[2]
    (run / "training_args.json").write_text(json.dumps({"target_modules": "to_q"}))
    assert "was trained on the layers 'to_q'" in layers_error(run, {}, flags)
    with pytest.raises(SystemExit, match="was trained on the layers 'to_q'"):
        main([*FLAGS, "--work_dir", str(run.parent), "--results", str(tmp_path / "curves.md")])
    assert not (run / "checkpoint-2").exists() and not (tmp_path / "curves.json").exists()
    (run / "training_args.json").write_text(json.dumps({"target_modules": ours}))
    assert layers_error(run, {}, flags) is None
    assert layers_error(run, {"points": {}, "target_modules": "to_q"}, flags) is None  # nothing scored yet
    scored = {"points": {"2": {}}, "target_modules": "to_q"}
    assert "was scored on the layers 'to_q'" in layers_error(run, scored, flags)
    assert layers_error(run, {**scored, "target_modules": ours}, flags) is None
