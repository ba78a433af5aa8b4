"""The parallel, resumable job runner with real worker processes (tiny work functions, so it stays fast)."""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.toyworld import runner_jobs
from toyworld.paths import REPO
from toyworld.runner import Job, one_line_error, run_jobs


def square_jobs(values, log, tag="v1"):
    return [Job(f"square{x}", (x, log), {"x": x, "tag": tag}) for x in values]


def ran(log):
    return sorted(int(line) for line in log.read_text().split()) if log.exists() else []


def test_jobs_run_in_workers_and_are_cached_by_their_settings(tmp_path):
    log, cache = tmp_path / "calls.txt", tmp_path / "cache"
    outcomes = run_jobs(square_jobs([3, 1, 2], log), runner_jobs.square, n_jobs=2, cache_dir=cache)
    assert [(o.job.name, o.result, o.cached) for o in outcomes] == [
        ("square3", {"square": 9}, False),
        ("square1", {"square": 1}, False),
        ("square2", {"square": 4}, False),
    ]
    assert ran(log) == [1, 2, 3] and len(list(cache.glob("*.json"))) == 3
    record = json.loads(outcomes[0].job.cache_file(cache).read_text())
    assert record["settings"] == {"x": 3, "tag": "v1"} and record["result"] == {"square": 9}

    # started again (an interrupted benchmark): finished jobs come from the cache, only the new one runs
    outcomes = run_jobs(square_jobs([3, 1, 2, 5], log), runner_jobs.square, n_jobs=2, cache_dir=cache)
    assert [o.cached for o in outcomes] == [True, True, True, False]
    assert [o.result["square"] for o in outcomes] == [9, 1, 4, 25]
    assert ran(log) == [1, 2, 3, 5]

    # other settings are another job: its cache entry is not reused
    outcomes = run_jobs(square_jobs([3], log, tag="v2"), runner_jobs.square, n_jobs=1, cache_dir=cache)
    assert not outcomes[0].cached and ran(log) == [1, 2, 3, 3, 5]


def test_a_cached_outcome_keeps_the_seconds_its_job_took_when_it_ran(tmp_path):
    cache = tmp_path / "cache"
    jobs = [Job(name, (name, 0.2), {"name": name}) for name in ("a", "b")]
    ran = run_jobs(jobs, runner_jobs.interval, n_jobs=2, cache_dir=cache)
    assert all(not o.cached and 0.2 <= o.seconds < 5 for o in ran)
    again = run_jobs(jobs, runner_jobs.interval, n_jobs=2, cache_dir=cache)
    assert all(o.cached for o in again)
    assert [o.seconds for o in again] == [o.seconds for o in ran]
    assert [o.result for o in again] == [o.result for o in ran]  # not run again: the same start and end


def test_a_failing_job_is_reported_in_one_line_and_the_others_finish(tmp_path, caplog):
    log, cache = tmp_path / "calls.txt", tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="toyworld.runner"):
        outcomes = run_jobs(square_jobs([2, -1, 4], log), runner_jobs.square, n_jobs=2, cache_dir=cache)
    good, bad, also_good = outcomes
    assert good.ok and also_good.ok and also_good.result == {"square": 16}
    assert bad.result is None
    assert bad.error == "RuntimeError: negative input -1 ... error: x must be >= 0"
    assert "second line of the message" in bad.job.cache_file(cache).with_suffix(".error.txt").read_text()
    assert any("square-1 FAILED: RuntimeError: negative input -1" in r.message for r in caplog.records)
    assert any("[3/3]" in r.message for r in caplog.records)  # one line per finished job, counted
    # the failed job is not cached: a second start retries it alone
    outcomes = run_jobs(square_jobs([2, -1, 4], log), runner_jobs.square, n_jobs=2, cache_dir=cache)
    assert [o.cached for o in outcomes] == [True, False, True]
    assert ran(log) == [-1, -1, 2, 4]


def test_a_dead_worker_is_reported_and_what_finished_before_stays_cached(tmp_path):
    log, cache = tmp_path / "calls.txt", tmp_path / "cache"
    jobs = square_jobs([2, -1, 3], log)
    outcomes = run_jobs(jobs, runner_jobs.die, n_jobs=1, cache_dir=cache, first=["square2", "square-1"])
    assert outcomes[0].ok and outcomes[0].result == {"square": 4}
    assert outcomes[1].error == "a worker process died (killed, or out of memory)"
    assert not outcomes[2].ok  # the pool is gone; reported, not raised
    assert [o.cached for o in run_jobs(jobs[:1], runner_jobs.die, n_jobs=1, cache_dir=cache)] == [True]


def test_an_unreadable_cache_file_means_running_again(tmp_path):
    log, cache = tmp_path / "calls.txt", tmp_path / "cache"
    [job] = square_jobs([7], log)
    cache.mkdir()
    job.cache_file(cache).write_text("{half a file")
    [outcome] = run_jobs([job], runner_jobs.square, n_jobs=1, cache_dir=cache)
    assert not outcome.cached and outcome.result == {"square": 49} and ran(log) == [7]
    assert json.loads(job.cache_file(cache).read_text())["result"] == {"square": 49}


def test_workers_use_one_thread(tmp_path):
    jobs = [Job(f"t{i}", None, {"i": i}) for i in range(2)]
    outcomes = run_jobs(jobs, runner_jobs.threads, n_jobs=2)
    assert [(o.result["torch"], o.result["omp"]) for o in outcomes] == [(1, "1"), (1, "1")]


def test_first_jobs_finish_before_the_others_start_and_run_together(tmp_path):
    jobs = [Job(name, (name, 1.0), {"name": name}) for name in ("a", "b", "c", "d")]
    outcomes = run_jobs(jobs, runner_jobs.interval, n_jobs=2, first=["b", "d"])
    times = {o.job.name: o.result for o in outcomes}
    assert max(times["b"]["end"], times["d"]["end"]) <= min(times["a"]["start"], times["c"]["start"])
    # the first jobs share nothing with each other: both workers run them at once
    assert times["b"]["start"] < times["d"]["end"] and times["d"]["start"] < times["b"]["end"]


def test_bad_calls_are_refused_before_any_work(tmp_path):
    log = tmp_path / "calls.txt"
    with pytest.raises(ValueError, match="unique"):
        run_jobs(square_jobs([1, 1], log), runner_jobs.square, n_jobs=1)
    with pytest.raises(ValueError, match="at least 1"):
        run_jobs(square_jobs([1], log), runner_jobs.square, n_jobs=0)
    assert not log.exists()


def test_one_line_error():
    assert one_line_error(ValueError("bad")) == "ValueError: bad"
    assert one_line_error(RuntimeError("training x failed:\nnoise\n\nerror: --lr is 0\n")) == (
        "RuntimeError: training x failed: ... error: --lr is 0"
    )
    assert one_line_error(KeyError()) == "KeyError"


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie, ended but not yet reaped, has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition()` came true within `seconds` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_process_whose_parent_already_ended_dies_at_once():
    code = (
        "import os; from toyworld.runner import die_with_parent\n"
        "die_with_parent(os.getppid()); print('kept', flush=True)\n"
        "die_with_parent(os.getppid() + 1); print('not killed', flush=True)"  # as if the parent ended before
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (-signal.SIGKILL, "kept\n")


BENCHMARK = """
import sys
from tests.toyworld import runner_jobs
from toyworld.runner import Job, run_jobs
run_jobs([Job("linger", sys.argv[1], {})], getattr(runner_jobs, sys.argv[2]), n_jobs=1)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize("job", ["linger", "linger_preloaded"])  # a child of its own, one from a fork server
def test_a_killed_benchmarks_worker_and_its_child_die_with_it(tmp_path, signal_number, job):
    pid_file, log = tmp_path / "pids.txt", tmp_path / "benchmark.log"
    with log.open("w") as output:  # (its resource tracker's note on the killed pool's semaphores goes here too)
        benchmark = subprocess.Popen(
            [sys.executable, "-c", BENCHMARK, str(pid_file), job],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    pids: list[int] = []
    try:
        assert wait_for(lambda: pid_file.exists() or benchmark.poll() is not None, 60), "no worker started in 60 s"
        assert pid_file.exists(), log.read_text()
        pids = [int(pid) for pid in pid_file.read_text().split()]  # the worker, (the fork server,) the child
        assert len(pids) == (2 if job == "linger" else 3) and all(running(pid) for pid in pids)
        benchmark.send_signal(signal_number)
        assert benchmark.wait(10) == -signal_number
        assert wait_for(lambda: not any(running(pid) for pid in pids), 5), "orphans still running"
    finally:
        benchmark.kill()
        benchmark.wait()
        for pid in pids:
            if running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
