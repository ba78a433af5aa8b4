"""Run independent benchmark jobs in parallel worker processes, one torch thread each, resumable through a cache.

The toy models are tiny, so a process gains nothing from a second thread and loses much to oversubscription
on a busy machine; `jobs` processes with one thread each use `jobs` cores. Each finished job's result is
written to `<cache_dir>/<name>-<key>.json`, the key a hash of everything the result depends on (the job's
`settings`): an interrupted benchmark started again with the same cache skips what it finished. A job that
raises is reported with a one-line error (its full text goes to `<name>-<key>.error.txt`) and the others go
on. One progress bar counts jobs (done/total, elapsed, ETA); each finished job logs one line.

On Linux the workers, and the processes they start through `start_script` (the training script: a new process, or
one forked from a server that imported the script's libraries once), are killed when their parent ends: a benchmark
killed (SIGKILL, SIGTERM) leaves no orphan running its queued jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger(__name__)

P = TypeVar("P")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WORKER_ENVIRONMENT = {
    **dict.fromkeys(THREAD_VARIABLES, "1"),
    "TQDM_DISABLE": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
}
CACHE_VERSION = 1
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    """libc's `prctl` on Linux; None elsewhere (or where it cannot be found)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up here, not between fork and exec


@dataclass(frozen=True)
class Job(Generic[P]):
    """One unit of work: `payload` goes to the work function; `settings` (JSON data) is what its result depends on."""

    name: str  # unique among the jobs, file-name safe
    payload: P
    settings: Mapping[str, Any]

    @property
    def key(self) -> str:
        """A short hash of the settings: the cache entry's identity."""
        text = json.dumps({"version": CACHE_VERSION, **self.settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def cache_file(self, cache_dir: Path) -> Path:
        return cache_dir / f"{self.name}-{self.key}.json"


@dataclass(frozen=True)
class Outcome(Generic[P]):
    """What became of one job: its result (JSON data) or its one-line error, whether it came from the cache, and
    the seconds it took (when it ran, for a cached one; 0 for a failed one)."""

    job: Job[P]
    result: dict[str, Any] | None
    error: str | None
    cached: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


def default_jobs() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_one_thread() -> None:
    """Make this process and the processes it starts use one torch/OpenMP thread.

    torch reads OMP_NUM_THREADS when it is first imported; if it already is, its thread count is set too.
    """
    for variable in THREAD_VARIABLES:
        os.environ[variable] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent (process `parent`) ends; if it already has, die
    now. Elsewhere nothing.

    Safe as a `preexec_fn` (between fork and exec; the setting survives exec). The kernel signals on the end of the
    parent *thread* that started this process: start such processes from a thread that lives as long as they should.
    The parent check closes the race of a parent that ended before the `prctl`.
    """
    if _PRCTL is None or _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def popen_dying_with_parent(command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen(command, **kwargs)` whose child is killed when this process ends (Linux)."""
    if _PRCTL is not None:
        kwargs["preexec_fn"] = functools.partial(die_with_parent, os.getpid())
    return subprocess.Popen(command, **kwargs)


@functools.cache
def _preloading_context(preload: tuple[str, ...]) -> Any:
    """The forkserver context whose server imports `preload` once; every child it forks starts with them imported.

    A process has one fork server: the first preload asked for is the one it keeps."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


def _run_script_in_child(script: str, args: Sequence[str], output: Any) -> None:
    """In a child of the fork server: run `script` as `python script *args` would, as `__main__`, with its stdout
    and stderr written to the connection `output`; killed when the fork server ends (Linux)."""
    die_with_parent(os.getppid())
    # multiprocessing hands each child the fork server's keep-alive pipe (for servers of its own); the server ends
    # when every copy is closed, so a child keeping one would keep the server, and itself, alive after the caller
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        server._forkserver_alive_fd = None
    for stream in (1, 2):
        os.dup2(output.fileno(), stream)
    output.close()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


@contextlib.contextmanager
def start_script(
    command: Sequence[str], preload: Sequence[str] = ()
) -> Iterator[tuple[Iterable[str], Callable[[], int]]]:
    """Start `command`, yielding (its stdout and stderr as lines, a function waiting for its exit status).

    Without `preload`, a new process dying with this one (`popen_dying_with_parent`). With `preload` (module names),
    `command` is `[python, script, *args]` and the script runs in a process forked from a server that imported
    `preload` once, so a run skips their import (seconds for torch, diffusers and peft); the fork server ends with
    this process and its children with it. A child still running when the block exits is killed.
    """
    if not preload:
        with popen_dying_with_parent(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
            assert child.stdout is not None
            yield child.stdout, child.wait
        return
    context = _preloading_context(tuple(preload))
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_run_script_in_child, args=(str(command[1]), list(command[2:]), writer))
    child.start()
    writer.close()  # the child holds the only writing end: the lines end when it exits
    lines = os.fdopen(os.dup(reader.fileno()), "r", errors="replace")
    reader.close()

    def wait() -> int:
        child.join()
        return int(child.exitcode if child.exitcode is not None else -1)

    try:
        with lines:
            yield lines, wait
    finally:
        if child.is_alive():
            child.kill()
        child.join()


def _worker_init(parent: int) -> None:
    die_with_parent(parent)
    use_one_thread()
    logging.getLogger().setLevel(logging.WARNING)


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """What spawned workers (and the processes they start) inherit: one thread, no progress bars of their own
    (the parent shows the one bar), library warnings off. Set before they start: they import torch and tqdm
    before any initializer runs, and both read these variables at import."""
    saved = {variable: os.environ.get(variable) for variable in WORKER_ENVIRONMENT}
    os.environ.update(WORKER_ENVIRONMENT)
    try:
        yield
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


def one_line_error(error: BaseException) -> str:
    """'RuntimeError: training x failed: ... | error: --foo is bad': the first and the last line of the message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(error).__name__}: {text}"


@dataclass(frozen=True)
class Cached:
    """A cache entry: a finished job's result and the seconds the job took when it ran."""

    result: dict[str, Any]
    seconds: float


def read_cached(job: Job[Any], cache_dir: Path | None) -> Cached | None:
    """The job's cache entry, or None (no cache, none written yet, or an unreadable or foreign file)."""
    if cache_dir is None:
        return None
    path = job.cache_file(cache_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable cache file %s (%s); running %s again", path, error, job.name)
        return None
    if not isinstance(record, dict) or record.get("key") != job.key or not isinstance(record.get("result"), dict):
        logger.warning("ignoring cache file %s: not this job's; running %s again", path, job.name)
        return None
    seconds = record.get("seconds", 0.0)
    return Cached(record["result"], float(seconds) if isinstance(seconds, int | float) else 0.0)


def write_cached(job: Job[Any], cache_dir: Path, result: dict[str, Any], seconds: float) -> Path:
    """Write the job's result atomically (a reader never sees half a file)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = job.cache_file(cache_dir)
    record = {"name": job.name, "key": job.key, "settings": job.settings, "seconds": seconds, "result": result}
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(partial, path)
    return path


def _timed(work: Callable[[P], dict[str, Any]], payload: P) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    result = work(payload)
    if not isinstance(result, dict):
        raise TypeError(f"a job's work function must return a dict, got {type(result).__name__}")
    return result, time.perf_counter() - started


def _submit(pool: ProcessPoolExecutor, work: Callable[[P], dict[str, Any]], job: Job[P]) -> Future[Any]:
    """Submit a job; on a pool broken by a dead worker, a future holding that error (reported like any other)."""
    try:
        return pool.submit(_timed, work, job.payload)
    except BrokenProcessPool as error:
        future: Future[Any] = Future()
        future.set_exception(error)
        return future


def cached_jobs(jobs: Sequence[Job[Any]], cache_dir: Path | None) -> list[Job[Any]]:
    """The jobs whose results the cache already holds."""
    return [job for job in jobs if read_cached(job, cache_dir) is not None]


def run_jobs(
    jobs: Sequence[Job[P]],
    work: Callable[[P], dict[str, Any]],
    n_jobs: int | None = None,
    cache_dir: Path | None = None,
    first: Sequence[str] = (),
    describe: Callable[[dict[str, Any]], str] | None = None,
    desc: str = "runs",
) -> list[Outcome[P]]:
    """Run `work(job.payload)` for every job not in the cache, `n_jobs` worker processes at a time.

    `work` must be a module-level function (workers are spawned processes) returning JSON data. The jobs named
    in `first` all finish before the others start (each creates something later ones share, e.g. a subject's
    class images); they must not depend on each other, and run in parallel like the rest. Returns one `Outcome`
    per job, in the order given; errors are reported, not raised.
    """
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
    n_jobs = default_jobs() if n_jobs is None else n_jobs
    if n_jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {n_jobs}")
    outcomes: dict[str, Outcome[P]] = {}
    for job in jobs:
        cached = read_cached(job, cache_dir)
        if cached is not None:
            outcomes[job.name] = Outcome(job, cached.result, None, True, cached.seconds)
    pending = [job for job in jobs if job.name not in outcomes]
    if outcomes:
        logger.info(
            "%d of %d %s found in %s; running the other %d", len(outcomes), len(jobs), desc, cache_dir, len(pending)
        )
    before = [job for name in first for job in pending if job.name == name]
    after = [job for job in pending if job not in before]
    started = time.perf_counter()

    def finish(job: Job[P], future: Future[tuple[dict[str, Any], float]], bar: tqdm) -> None:
        try:
            result, seconds = future.result()
        except BrokenProcessPool:
            outcome = Outcome(job, None, "a worker process died (killed, or out of memory)", False, 0.0)
        except Exception as error:  # one job's failure must not stop the others
            outcome = Outcome(job, None, one_line_error(error), False, 0.0)
            if cache_dir is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                text = "".join(traceback.format_exception(error))
                job.cache_file(cache_dir).with_suffix(".error.txt").write_text(text)
        else:
            if cache_dir is not None:
                write_cached(job, cache_dir, result, seconds)
            outcome = Outcome(job, result, None, False, seconds)
        outcomes[job.name] = outcome
        bar.update(1)
        done = f"[{bar.n}/{bar.total}]"
        if outcome.ok:
            detail = f": {describe(outcome.result)}" if describe is not None and outcome.result is not None else ""
            logger.info("%s %s done in %.0f s%s", done, job.name, outcome.seconds, detail)
        else:
            logger.error("%s %s FAILED: %s", done, job.name, outcome.error)

    with (
        logging_redirect_tqdm(),
        tqdm(total=len(jobs), initial=len(outcomes), desc=desc, unit="run", dynamic_ncols=True) as bar,
    ):
        if pending:
            context = multiprocessing.get_context("spawn")
            with (
                _worker_environment(),
                ProcessPoolExecutor(
                    min(n_jobs, len(pending)), mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
                ) as pool,
            ):
                for stage in (before, after):
                    futures = {_submit(pool, work, job): job for job in stage}
                    while futures:
                        done, _ = wait(futures, return_when=FIRST_COMPLETED)
                        for future in done:
                            finish(futures.pop(future), future, bar)
    failed = [o for o in outcomes.values() if not o.ok]
    logger.info(
        "%d %s in %.1f min: %d run, %d from the cache, %d failed",
        len(jobs),
        desc,
        (time.perf_counter() - started) / 60,
        len(pending) - len(failed),
        len(jobs) - len(pending),
        len(failed),
    )
    return [outcomes[job.name] for job in jobs]
