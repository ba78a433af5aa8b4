"""Work functions for tests/toyworld/test_runner.py: module level, so spawned worker processes can import them."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from toyworld.runner import popen_dying_with_parent, start_script


def square(payload: tuple[int, Path]) -> dict[str, Any]:
    """x -> x * x; each call appends its x to `log` (how the tests see which jobs really ran)."""
    x, log = payload
    with log.open("a") as handle:
        handle.write(f"{x}\n")
    if x < 0:
        raise RuntimeError(f"negative input {x}\nsecond line of the message\nerror: x must be >= 0")
    return {"square": x * x}


def threads(_: object) -> dict[str, Any]:
    """What a worker process runs with."""
    import torch

    return {"torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid()}


def interval(payload: tuple[str, float]) -> dict[str, Any]:
    """Sleep; return when it started and ended (wall clock, comparable across processes)."""
    _, seconds = payload
    started = time.time()
    time.sleep(seconds)
    return {"start": started, "end": time.time()}


def die(payload: tuple[int, Path]) -> dict[str, Any]:
    """A worker killed mid-job (as by the out-of-memory killer) for x < 0; else `square`."""
    if payload[0] < 0:
        os._exit(9)
    return square(payload)


def linger(pid_file: str) -> dict[str, Any]:
    """A long job: start a child as `run_with_progress` starts the training script, write 'worker-pid child-pid' to
    `pid_file`, and wait for the child (30 s: a bound on what a failing test leaves behind)."""
    child = popen_dying_with_parent([sys.executable, "-c", "import time; time.sleep(30)"])
    partial = Path(f"{pid_file}.partial")
    partial.write_text(f"{os.getpid()} {child.pid}\n")
    partial.replace(pid_file)
    child.wait()
    return {}


LINGERING_SCRIPT = """
import os, sys, time
from pathlib import Path
partial = Path(sys.argv[1] + ".partial")
partial.write_text(f"{sys.argv[2]} {os.getppid()} {os.getpid()}\\n")  # the worker, the fork server, this process
partial.replace(sys.argv[1])
time.sleep(30)
"""


def linger_preloaded(pid_file: str) -> dict[str, Any]:
    """As `linger`, the child started by `start_script` from a preloading fork server, as `train` starts the
    training script; 'worker-pid fork-server-pid child-pid' goes to `pid_file`."""
    script = Path(f"{pid_file}.py")
    script.write_text(LINGERING_SCRIPT)
    with start_script([sys.executable, str(script), pid_file, str(os.getpid())], ("json",)) as (lines, wait):
        for _ in lines:
            pass
        wait()
    return {}
