"""The subject-driven benchmark end to end in its smallest form: train Lily and LoRA, generate, score."""

import json

import numpy as np
from PIL import Image

from benchmarks.subject_driven import plan_runs
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
)
from toyworld.evaluate import ToyEvaluator
from toyworld.render import COLOURS, Scene, render


def test_evaluator_separates_the_subject_from_plain_stars():
    evaluator = ToyEvaluator.load()
    instances = [Image.open(p).convert("RGB") for p in sorted(SUBJECT_DIR.glob("*.png"))]
    assert len(instances) == 5
    assert evaluator.subject_probability(instances).min() >= 0.9
    stars = [render(Scene("star", (colour,), "gray", 16.0, 16.0, 11.0)) for colour in COLOURS]
    assert evaluator.subject_probability(stars).max() < 0.5


def test_full_plan_is_the_issue_grid():
    runs = plan_runs(quick=False, steps=200)
    assert len(runs) == 2 * 3 * 2 * 3  # methods x learning rates x prior on/off x seeds
    assert {r.method for r in runs} == {"lily", "lora"} and {r.prior for r in runs} == {False, True}


def test_quick_run_trains_both_methods_and_scores_them(tmp_path):
    specs = [RunSpec("lily", 3e-3, False, 0, 8), RunSpec("lora", 3e-3, True, 0, 8)]
    results, base_scores = run_all(specs, tmp_path, 4, EvalPlan(seeds=(0,), steps=4))
    assert base_scores["subject"] < 0.5  # the base model never shows the subject
    lily, lora = results
    assert lily.adapter.kind == "lily" and lora.adapter.kind == "lora"
    assert lily.adapter.num_parameters <= lora.adapter.num_parameters  # Lily within LoRA's budget
    for result in results:
        assert set(result.scores) == {
            "subject",
            "similarity",
            "background",
            "background_seen",
            "background_unseen",
            "class_preservation",
        }
        assert all(np.isfinite(v) for v in result.scores.values())
        assert result.file_bytes == result.adapter.path.stat().st_size > 0
    records = json.loads(json.dumps(results_records(results)))
    assert [(r["method"], r["prior"], r["params"]) for r in records] == [
        ("lily", False, lily.adapter.num_parameters),
        ("lora", True, lora.adapter.num_parameters),
    ]
    assert records[0]["scores"].keys() == lily.scores.keys()
    table = results_table(results, base_scores)
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
