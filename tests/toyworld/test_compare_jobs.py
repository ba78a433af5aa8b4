"""The comparison runs as cached jobs: what the cache key holds (the run, the plan, the models' bytes), and not."""

from pathlib import Path

from toyworld.compare import EvalPlan, RunSpec
from toyworld.compare_jobs import BASE_JOB, files_fingerprint, make_jobs

PLAN = EvalPlan()
SPECS = [RunSpec("lily", 3e-3, False, 0, 40), RunSpec("lora", 3e-3, True, 1, 40)]


def test_jobs_are_the_base_model_then_each_run():
    jobs = make_jobs(SPECS, Path("runs"), 4, EvalPlan(seeds=(0, 1)))
    assert [job.name for job in jobs] == [BASE_JOB, "lily-lr0.003-noprior-seed0", "lora-lr0.003-prior-seed1"]
    assert jobs[0].payload.spec is None and jobs[2].payload.spec == SPECS[1]
    assert jobs[1].settings["spec"] == {
        "method": "lily",
        "learning_rate": 3e-3,
        "prior": False,
        "seed": 0,
        "steps": 40,
    }


def test_the_key_follows_the_settings_not_the_folder():
    def keys(specs, work_dir="a", rank=4, plan=PLAN):
        return [job.key for job in make_jobs(specs, Path(work_dir), rank, plan)]

    assert keys(SPECS) == keys(SPECS, work_dir="elsewhere")  # a moved work_dir keeps its cache
    assert keys(SPECS)[1:] != keys(SPECS, rank=8)[1:]
    assert keys(SPECS) != keys(SPECS, plan=EvalPlan(steps=10))
    longer = [RunSpec("lily", 3e-3, False, 0, 80), SPECS[1]]
    assert keys(longer)[1] != keys(SPECS)[1] and keys(longer)[2] == keys(SPECS)[2]


def test_the_models_fingerprint_changes_with_any_byte(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    before = files_fingerprint.__wrapped__(tmp_path)
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\x00\x02")
    assert files_fingerprint.__wrapped__(tmp_path) != before
