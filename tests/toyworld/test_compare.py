"""The subject-driven benchmark end to end in its smallest form: train Lily and LoRA, generate, score."""

import json

import numpy as np
import pytest
from PIL import Image

from lily_diffusion.grids import GridAdapter
from toyworld.compare import (
    SUBJECT_DIR,
    EvalPlan,
    RunResult,
    RunSpec,
    best_runs,
    results_records,
    results_table,
    run_all,
    training_flags,
)
from toyworld.evaluate import ToyEvaluator
from toyworld.methods import TARGET_MODULES_FLAG
from toyworld.render import COLOURS, Scene, render
from toyworld.subjects import SUBJECTS


def test_evaluator_separates_the_subject_from_plain_stars():
    evaluator = ToyEvaluator.load()
    instances = [Image.open(p).convert("RGB") for p in sorted(SUBJECT_DIR.glob("*.png"))]
    assert len(instances) == 5
    assert evaluator.subject_probability(instances).min() >= 0.9
    stars = [render(Scene("star", (colour,), "gray", 16.0, 16.0, 11.0)) for colour in COLOURS]
    assert evaluator.subject_probability(stars).max() < 0.5


def test_training_flags_follow_the_method_table_and_the_recipe_flags_replace_defaults(tmp_path):
    spec = RunSpec("lily", 1e-3, True, 2, 300, "square", 2, ("--lr_scheduler=cosine", "--cache_latents"))
    assert spec.name == "square-lily-budget2-lr0.001-cosine-prior-seed2"  # never the folder of a constant-lr run
    assert spec.label == "Lily lr 0.001 cosine, prior, seed 2"
    constant = RunSpec("lily", 1e-3, True, 2, 300, "square", 2, ("--lr_scheduler=constant",))
    assert (
        constant.name
        == RunSpec("lily", 1e-3, True, 2, 300, "square", 2).name
        == "square-lily-budget2-lr0.001-prior-seed2"
    )
    flags = training_flags(spec, tmp_path / "out", tmp_path / "class")
    assert "--instance_data_dir=" + str(SUBJECTS["square"].folder) in flags
    assert "--class_prompt=a photo of a square" in flags and f"--class_data_dir={tmp_path / 'class'}" in flags
    assert [f for f in flags if f.startswith("--lr_scheduler")] == ["--lr_scheduler=cosine"]  # replaced, not twice
    assert flags[-1] == "--cache_latents"
    assert {"--adapter=lily", "--lily_stride_A=8", "--lily_num_B=2", "--match_lora_budget=2"} <= set(flags)
    assert "--rank=8" in training_flags(RunSpec("lora", 1e-3, False, 0, 300, budget=8), tmp_path, tmp_path)
    assert TARGET_MODULES_FLAG in flags  # every method adapts the workbench's layers ...
    attention = RunSpec("lily", 1e-3, False, 0, 300, extra_flags=("--target_modules=.*to_q$",))
    targets = [f for f in training_flags(attention, tmp_path, tmp_path) if f.startswith("--target_modules")]
    assert targets == ["--target_modules=.*to_q$"]  # ... unless the run's own flags name others


def test_quick_run_trains_both_methods_and_scores_them(tmp_path):
    specs = [RunSpec("lily", 3e-3, False, 0, 8), RunSpec("lora", 3e-3, True, 0, 8)]
    results, base_scores = run_all(specs, tmp_path, EvalPlan(seeds=(0,), steps=4))
    assert list(base_scores) == ["star"] and base_scores["star"]["subject"] < 0.5  # the base never shows the subject
    lily, lora = results
    assert lily.adapter.kind == "lily" and lora.adapter.kind == "lora"
    assert lily.adapter.num_parameters <= lora.adapter.num_parameters  # Lily within LoRA's budget
    assert lily.settings == {"r": 7, "stride_A": 4, "num_B": 4} and lora.settings == {}  # read from the files
    for result in results:
        assert set(result.scores) == {
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
        assert all(np.isfinite(v) for v in result.scores.values())
        # one prompt per background, as many images each: the overall fidelity is the mean of the three
        by_background = [result.scores[f"subject_{b}"] for b in ("white", "gray", "black")]
        assert result.scores["subject"] == pytest.approx(np.mean(by_background), abs=1e-6)
        assert result.file_bytes == result.adapter.path.stat().st_size > 0
    records = json.loads(json.dumps(results_records(results)))
    assert [(r["method"], r["prior"], r["params"], r["budget_rank"], r["subject"]) for r in records] == [
        ("lily", False, lily.adapter.num_parameters, 4, "star"),
        ("lora", True, lora.adapter.num_parameters, 4, "star"),
    ]
    assert records[0]["name"] == specs[0].name and records[0]["adapter"] == lily.settings
    assert records[0]["scores"].keys() == lily.scores.keys()
    table = results_table(results, base_scores["star"])
    assert "| lily | 0.003 | off | " in table and "| lora | 0.003 | on | " in table
    assert "prompt fidelity, seen backgrounds | prompt fidelity, unseen background" in table
    assert "(n=1)" in table and "±" not in table  # one seed: no spread to show


def test_class_prompt_images_use_distinct_seeds():
    assert EvalPlan(seeds=(0, 1, 2, 3)).class_seeds == (0, 1, 2, 3, 4, 5, 6, 7)
    assert len(set(EvalPlan(seeds=(5, 2)).class_seeds)) == 4


def test_best_runs_keeps_one_run_per_method_and_prior():
    def result(method, prior, seed, subject, similarity):
        spec = RunSpec(method, 3e-3, prior, seed, 10)
        adapter = GridAdapter(spec.name, None, method, 1)
        return RunResult(spec, adapter, 0, 0.0, {"subject": subject, "similarity": similarity})

    runs = [
        result("lily", False, 0, 0.1, 0.2),
        result("lily", False, 1, 0.4, 0.3),
        result("lily", True, 0, 0.0, 0.5),
        result("lora", False, 0, 0.0, 0.1),
        result("lora", False, 1, 0.0, 0.3),
    ]
    best = best_runs(runs)
    assert [(r.spec.method, r.spec.prior, r.spec.seed) for r in best] == [
        ("lily", False, 1),
        ("lily", True, 0),
        ("lora", False, 1),
    ]
    assert best[0].spec.label == "Lily lr 0.003, no prior, seed 1"
