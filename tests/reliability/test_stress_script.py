"""`python -m scripts.stress_inputs --quick`: a handful of issue 9's cases (a secret, a kill during a save then a
resume, a hostile regex in a file, an image bomb, lily-grid in normal use and refusing, a negative learning rate)
run end to end by the stress script, which must find every one of them clean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scripts.stress_cases import QUICK
from scripts.stress_table import Outcome, problem_table, summary_line

REPO = Path(__file__).resolve().parents[2]


def test_the_quick_subset_is_all_clean(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "scripts.stress_inputs", "--quick", "--keep", str(tmp_path / "cases")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    n = len(QUICK)
    assert lines[-1] == f"{n} tried, {n} clean, 0 tracebacks, 0 lost, 0 hangs, 0 secrets, 0 wrong", result.stdout
    assert result.returncode == 0
    assert "Traceback" not in result.stderr
    assert (tmp_path / "cases" / "fixture-lily" / "out" / "checkpoint-3" / "checkpoint_complete.json").is_file()


def test_the_summary_counts_each_case_once_under_its_worst_category():
    outcomes = [
        Outcome("a", "g", "clean", "", 1.0),
        Outcome("b", "g", "traceback", "ValueError: x", 1.0),
        Outcome("c", "g", "lost", "checkpoint-1 removed", 1.0),
        Outcome("d", "g", "secret", "secret in out/training_args.json", 1.0),
        Outcome("e", "g", "wrong", "accepted (exit 0)", 1.0),
        Outcome("f", "g", "hang", "still running after 60 s", 1.0),
    ]
    assert summary_line(outcomes) == "6 tried, 1 clean, 1 tracebacks, 1 lost, 1 hangs, 1 secrets, 1 wrong"
    table = problem_table(outcomes).splitlines()
    assert [line.split()[0] for line in table] == ["secret", "lost", "hang", "traceback", "wrong"]


def test_steps_are_judged_by_their_exit_and_output(tmp_path):
    from scripts.stress_cases import Step, fixture_paths
    from scripts.stress_inputs import StepResult, judge_step, leaked_secrets

    fixtures = fixture_paths(tmp_path)

    def judge(step: Step, code: int | None, stderr: str, timed_out: bool = False, signal: int | None = None) -> str:
        return judge_step(step, StepResult(code, signal, timed_out, 1.0, "", stderr), tmp_path, fixtures)[0]

    refuse, ok = Step("train", (), expect="refuse"), Step("train", (), resumes=True)
    crash = "Traceback (most recent call last):\n  File x\nValueError: boom\n"
    assert judge(refuse, 1, "error: --resolution must be a multiple of 8") == "clean"
    assert judge(refuse, 1, crash) == "traceback"
    assert judge(refuse, None, "", timed_out=True) == "hang"
    assert judge(refuse, None, "", signal=11) == "traceback"
    assert judge(refuse, 0, "saved") == "wrong"
    assert judge(refuse, 1, "something went wrong\n  in two lines") == "wrong"
    assert judge(ok, 1, "error: cannot resume from checkpoint-2") == "lost"
    assert judge(Step("train", (), expect="killed"), None, "", signal=9) == "clean"
    (tmp_path / "out" / "logs").mkdir(parents=True)
    (tmp_path / "out" / "logs" / "events").write_bytes(b"\0hparams hf_SECRET_x\0")
    assert leaked_secrets(tmp_path, b"hf_SECRET") == ["out/logs/events"]
