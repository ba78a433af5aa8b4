"""The comparison runs as cached jobs: what the cache key holds (the run, the plan, the models' bytes), and not."""

import dataclasses
from pathlib import Path

from toyworld.compare import EvalPlan, RunSpec
from toyworld.compare_jobs import files_fingerprint, first_runs, make_jobs
from toyworld.methods import TARGET_MODULES_FLAG

PLAN = EvalPlan()
SPECS = [RunSpec("lily", 3e-3, False, 0, 40), RunSpec("lora", 3e-3, True, 1, 40, "square", 2)]


def test_jobs_are_the_base_model_per_subject_then_each_run():
    jobs = make_jobs(SPECS, Path("runs"), EvalPlan(seeds=(0, 1)))
    assert [job.name for job in jobs] == [
        "base-model-star",
        "base-model-square",
        "star-lily-budget4-lr0.003-noprior-seed0",
        "square-lora-budget2-lr0.003-prior-seed1",
    ]
    assert [(job.payload.spec, job.payload.subject) for job in jobs[:2]] == [(None, "star"), (None, "square")]
    assert jobs[3].payload.spec == SPECS[1] and jobs[3].payload.subject == "square"
    assert jobs[2].settings["spec"] == {
        "method": "lily",
        "learning_rate": 3e-3,
        "prior": False,
        "seed": 0,
        "steps": 40,
        "subject": "star",
        "budget": 4,
        "extra_flags": (),
    }
    # the adapter's own flags (its sharing at the budget, the layers it adapts) are part of the key too: a cached
    # score of the same spec trained on other layers is not this run's
    assert jobs[2].settings["method_flags"] == [
        "--adapter=lily",
        "--lily_stride_A=4",
        "--lily_num_B=4",
        "--match_lora_budget=4",
        TARGET_MODULES_FLAG,
    ]


def test_the_key_follows_the_settings_not_the_folder():
    def keys(specs, work_dir="a", plan=PLAN):
        return [job.key for job in make_jobs(specs, Path(work_dir), plan)]

    assert keys(SPECS) == keys(SPECS, work_dir="elsewhere")  # a moved work_dir keeps its cache
    assert keys(SPECS) != keys(SPECS, plan=EvalPlan(steps=10))
    longer = [RunSpec("lily", 3e-3, False, 0, 80), SPECS[1]]
    assert keys(longer)[2] != keys(SPECS)[2] and keys(longer)[3] == keys(SPECS)[3]
    for change in ({"budget": 8}, {"extra_flags": ("--lr_scheduler=cosine",)}, {"subject": "circle"}):
        changed = [dataclasses.replace(SPECS[0], **change)]
        assert keys(changed)[-1] != keys(SPECS[:1])[-1]


def test_the_models_fingerprint_changes_with_any_byte(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    before = files_fingerprint.__wrapped__(tmp_path)
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\x00\x02")
    assert files_fingerprint.__wrapped__(tmp_path) != before


def test_only_a_subjects_first_of_several_prior_runs_runs_first():
    """It generates the class images the others read; a subject's only prior run waits for nothing."""
    lily, lora_square = SPECS
    seeds = [dataclasses.replace(lora_square, seed=seed) for seed in (0, 1, 2)]
    star_prior = dataclasses.replace(lily, prior=True)
    jobs = make_jobs([lily, star_prior, *seeds], Path("runs"), PLAN)
    assert first_runs(jobs) == ["square-lora-budget2-lr0.003-prior-seed0"]
    assert first_runs(make_jobs([lily, star_prior], Path("runs"), PLAN)) == []  # the demo: one prior run
