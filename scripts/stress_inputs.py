"""Replay issue 9's hostile inputs and faults (and more of the same kind) against the training script, the loader and
lily-grid on the bundled toy model, and count how each case came out.

    python -m scripts.stress_inputs                # every case, about 3 minutes on 2 CPU cores
    python -m scripts.stress_inputs --only grid    # the cases whose name contains "grid"
    python -m scripts.stress_inputs --quick        # a handful of cases (the test's subset)

The last line reads `N tried, N clean, N tracebacks, N lost, N hangs, N secrets, N wrong`:
- traceback: "Traceback (most recent call last)" in the output, an exception escaping, or a crash by a signal;
- lost: an earlier complete checkpoint or weight file destroyed or no longer resumable, or non-finite or unreadable
  weights written;
- hang: a step still running after its timeout;
- secret: a planted secret (`hf_SECRET...`) in any file under the case's output folder, or in stdout/stderr;
- wrong: any other expectation missed (a bad input accepted, a good one refused, a refusal that is not one line, a
  missing warning, a resumed run that differs from an uninterrupted one);
- clean: every step did what the case expects.

Each case runs in its own temporary folder; at most `--jobs` (2) at once, every process with one thread, offline.
Steps are processes forked from this warm process (imports and the toy pipeline already loaded), or a fresh
interpreter where the case needs one. Exit status 0 when no case is a traceback, loss, hang or secret.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from toyworld.paths import REPO
from toyworld.runner import die_with_parent, popen_dying_with_parent

logger = logging.getLogger("stress")

ENVIRONMENT = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
TRACEBACK = "Traceback (most recent call last)"
POLL_S = 0.01


@dataclass
class StepResult:
    """How one step's process ended and what it printed."""

    code: int | None  # exit status; None when killed by a signal or timed out
    signal: int | None
    timed_out: bool
    seconds: float
    stdout: str
    stderr: str


# Running one step.


def _child_spec(step, case_dir: Path, index: int, fixtures) -> object:
    from .stress_cases import expand
    from .stress_child import ChildSpec

    paths = fixtures.paths(case_dir)
    logs = case_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**ENVIRONMENT, "HF_HOME": str(case_dir / "hf_home"), **step.env}
    return ChildSpec(
        target=step.target,
        args=[expand(arg, paths) for arg in step.args],
        stdout=str(logs / f"{index}.out"),
        stderr=str(logs / f"{index}.err"),
        cwd=str(case_dir),
        env=env,
        kwargs=dict(step.kwargs),
        kill_on=list(step.kill_on) if step.kill_on else None,
        max_file_bytes=step.max_file_bytes,
        umask=step.umask,
        no_file_powers=step.no_file_powers,
    )


def _fork_step(spec) -> int:
    from .stress_child import child_main

    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            die_with_parent(parent)  # no step outlives its case
            code = child_main(spec)
        finally:
            os._exit(code)
    return pid


def _exec_step(spec) -> int:
    """A fresh interpreter: `python -m scripts.stress_child SPEC.json`."""
    from .stress_child import spec_to_json

    spec_file = Path(spec.cwd) / f"{Path(spec.stdout).stem}.spec.json"
    spec_file.write_text(spec_to_json(spec))
    env = {**os.environ, **spec.env, "PYTHONPATH": str(REPO)}
    with open(spec.stderr, "ab") as err:
        process = popen_dying_with_parent(
            [sys.executable, "-m", "scripts.stress_child", str(spec_file)],
            cwd=spec.cwd,
            env=env,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
    return process.pid


@dataclass
class RunningStep:
    """A step's process in flight."""

    pid: int
    stdout: str
    stderr: str
    started: float
    deadline: float


def start_step(step, case_dir: Path, index: int, fixtures, time_scale: float) -> RunningStep:
    """Start one step in its own process group."""
    spec = _child_spec(step, case_dir, index, fixtures)
    started = time.monotonic()
    pid = _exec_step(spec) if step.fresh else _fork_step(spec)
    return RunningStep(pid, spec.stdout, spec.stderr, started, started + step.timeout * time_scale)


def poll_step(running: RunningStep) -> StepResult | None:
    """The step's result once it has ended (SIGKILL to its group past its deadline), else None."""
    done, status = os.waitpid(running.pid, os.WNOHANG)
    timed_out = not done and time.monotonic() > running.deadline
    if not done and not timed_out:
        return None
    _kill_group(running.pid)  # a step past its deadline, or what a step left running (data loader workers)
    if timed_out:
        _, status = os.waitpid(running.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    read = lambda path: Path(path).read_text(errors="replace") if Path(path).exists() else ""  # noqa: E731
    return StepResult(
        code=None if timed_out or code < 0 else code,
        signal=-code if code < 0 and not timed_out else None,
        timed_out=timed_out,
        seconds=time.monotonic() - running.started,
        stdout=read(running.stdout),
        stderr=read(running.stderr),
    )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# Judging a step and a case.


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def traceback_summary(text: str) -> str:
    """The exception line that ends the first traceback in `text`."""
    tail = text[text.index(TRACEBACK) :].splitlines()
    for line in tail[1:]:
        if line and not line.startswith((" ", "\t")) and not line.startswith("During handling"):
            return line.strip()
    return "a traceback"


def judge_step(step, result: StepResult, case_dir: Path, fixtures) -> tuple[str, str]:
    """The step's category and a short note, from its exit and output."""
    from .stress_cases import expand

    text = result.stdout + result.stderr
    message = last_line(result.stderr) or last_line(result.stdout)
    if result.timed_out:
        return "hang", f"still running after {step.timeout:g} s"
    if TRACEBACK in text:
        return "traceback", traceback_summary(text)
    if result.signal is not None:
        if step.expect == "killed" and result.signal == signal.SIGKILL:
            return "clean", "killed as planned"
        return "traceback", f"died of signal {signal.Signals(result.signal).name}"
    if step.expect == "killed":
        return "wrong", f"the planted kill did not happen (exit {result.code}: {message})"
    refused = result.code != 0
    failed = "lost" if step.resumes else "wrong"
    if refused and "error" not in message.lower():
        return failed, f"exit {result.code} without a one-line error: {message!r}"
    if step.expect == "ok" and refused:
        return failed, f"refused: {message}"
    if step.expect == "refuse" and not refused:
        return "wrong", f"accepted (exit 0): {message}"
    lowered = text.lower()
    missing = [phrase for phrase in step.says if phrase.lower() not in lowered]
    if missing:
        return "wrong", f"output lacks {missing}: {message}"
    if not refused:
        paths = fixtures.paths(case_dir)
        absent = [expand(path, paths) for path in step.makes if not Path(expand(path, paths)).exists()]
        if absent:
            return failed, f"exit 0 but no {', '.join(absent)}"
    return "clean", message


def weight_files(out: Path) -> dict[Path, str]:
    """Final weight files and the files of complete checkpoints in `out`, with their SHA-256."""
    from lily_diffusion.training.checkpointing import checkpoint_problem, list_checkpoints

    if not out.is_dir():
        return {}
    found = [p for p in out.glob("pytorch_*_weights.safetensors") if p.is_file()]
    for _, folder in list_checkpoints(out):
        if checkpoint_problem(folder) is None:
            found += [p for p in folder.rglob("*") if p.is_file()]
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in found}


def unusable_weights(out: Path, before: dict[Path, tuple[int, int]]) -> list[str]:
    """Safetensors files under `out` written or changed since `before` that cannot be read or are not finite
    (temporary files and folders of an interrupted save excepted)."""
    import torch
    from safetensors import SafetensorError, safe_open

    problems = []
    for path, stamp in _safetensors_stamps(out).items():
        if before.get(path) == stamp:
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                bad = [k for k in handle.keys() if not torch.isfinite(handle.get_tensor(k).float()).all()]  # noqa: SIM118
        except (SafetensorError, OSError) as error:
            problems.append(f"{path.relative_to(out)} unreadable ({error})")
            continue
        if bad:
            problems.append(f"{path.relative_to(out)} has non-finite {bad[0]}")
    return problems


def _safetensors_stamps(out: Path) -> dict[Path, tuple[int, int]]:
    if not out.is_dir():
        return {}
    stamps = {}
    for path in out.rglob("*.safetensors"):
        parts = path.relative_to(out).parts
        temporary = any(part.startswith(".") or part.endswith((".partial", ".removing")) for part in parts)
        if path.is_file() and not temporary:
            stat = path.stat()
            stamps[path] = (stat.st_size, stat.st_mtime_ns)
    return stamps


def leaked_secrets(case_dir: Path, mark: bytes) -> list[str]:
    """Files under the case's output folder and logs that contain `mark`."""
    found = []
    for folder in (case_dir / "out", case_dir / "logs"):
        if folder.is_dir():
            for path in folder.rglob("*"):
                if path.is_file() and not path.name.endswith(".spec.json") and mark in path.read_bytes():
                    found.append(str(path.relative_to(case_dir)))
    return found


def run_case(case, case_dir: Path, fixtures) -> Generator[tuple[object, int], StepResult, dict[str, object]]:
    """Set up, run every step (stopping at the first that is not clean), check: a generator that yields each
    (step, index) to run and is sent its StepResult; it returns the case's outcome as a dict."""
    from .stress_cases import SECRET_MARK
    from .stress_table import worst

    start = time.monotonic()
    case_dir.mkdir(parents=True, exist_ok=True)
    categories, notes = [], []
    if case.setup is not None:
        case.setup(case_dir, fixtures)
    out = case_dir / "out"
    for index, step in enumerate(case.steps):
        results_before = weight_files(out)
        stamps_before = _safetensors_stamps(out)
        result = yield step, index
        category, note = judge_step(step, result, case_dir, fixtures)
        if category == "clean":
            category, note = _check_preserved(step, out, results_before) or (category, note)
        lost = unusable_weights(out, stamps_before)
        if lost and category != "traceback":
            category, note = "lost", f"wrote unusable weights: {lost[0]}"
        categories.append(category)
        notes.append(f"step {index + 1}: {note}" if len(case.steps) > 1 else note)
        if category != "clean":
            break
    else:
        problem = case.check(case_dir, fixtures) if case.check is not None else None
        if problem:
            lost = problem.startswith("lost: ")
            categories.append("lost" if lost else "wrong")
            notes.append(problem.removeprefix("lost: "))
    leaks = leaked_secrets(case_dir, SECRET_MARK)
    if leaks:
        categories.append("secret")
        notes.append(f"secret in {', '.join(leaks[:3])}")
    category = worst(categories)
    shown = [n for c, n in zip(categories, notes, strict=False) if c == category] or notes[-1:]
    return {"category": category, "note": shown[0] if shown else "", "seconds": time.monotonic() - start}


def _check_preserved(step, out: Path, before: dict[Path, str]) -> tuple[str, str] | None:
    """A refused step must leave every earlier result byte for byte; a killed one must leave a complete checkpoint."""
    from lily_diffusion.training.checkpointing import checkpoint_problem, list_checkpoints

    if step.expect == "refuse":
        after = weight_files(out)
        changed = [path for path, digest in before.items() if after.get(path) != digest]
        if changed:
            return "lost", f"the refused run changed or removed {changed[0].relative_to(out)}"
    had_checkpoint = any(path.parent != out for path in before)
    complete = any(checkpoint_problem(folder) is None for _, folder in list_checkpoints(out))
    if step.expect == "killed" and had_checkpoint and not complete:
        return "lost", "no complete checkpoint is left after the kill"
    return None


# Running every case, at most `jobs` at once.


@dataclass
class RunningCase:
    """A case in flight: its generator (see run_case) and the step it is waiting for."""

    index: int
    case: object
    case_dir: Path
    steps: Generator
    step: RunningStep | None = None


def _advance(running: RunningCase, result: StepResult | None, fixtures, time_scale: float) -> dict | None:
    """Feed the case its last step's result; start the next step, or return the case's outcome."""
    try:
        step, index = running.steps.send(result)
    except StopIteration as stop:
        return stop.value
    except Exception as error:  # a bug of this script, reported as the case's note
        return {"category": "traceback", "note": f"stress runner: {type(error).__name__}: {error}", "seconds": 0}
    running.step = start_step(step, running.case_dir, index, fixtures, time_scale)
    return None


def run_cases(cases: list, root: Path, fixtures, jobs: int, time_scale: float, by_name: bool = False) -> list:
    """Run `cases` (at most `jobs` steps at once), each in `root/NNN` (or `root/NAME`); their outcomes, in order.

    Setting up and judging happen here; each step is a process forked from here (so from the warm state)."""
    from .stress_table import Outcome

    pending = list(enumerate(cases))
    running: list[RunningCase] = []
    outcomes: dict[int, Outcome] = {}

    def finish(item: RunningCase, data: dict) -> None:
        outcome = Outcome(item.case.name, item.case.group, data["category"], data["note"], data["seconds"])
        outcomes[item.index] = outcome
        level = logging.INFO if outcome.category == "clean" else logging.WARNING
        note = "" if outcome.category == "clean" else f": {outcome.note}"
        logger.log(level, "[%d/%d] %-9s %s (%.1f s)%s", len(outcomes), len(cases), outcome.category,
                   item.case.name, outcome.seconds, note)  # fmt: skip

    while pending or running:
        while pending and len(running) < jobs:
            index, case = pending.pop(0)
            case_dir = root / (case.name if by_name else f"{index:03d}")
            item = RunningCase(index, case, case_dir, run_case(case, case_dir, fixtures))
            data = _advance(item, None, fixtures, time_scale)
            if data is None:
                running.append(item)
            else:
                finish(item, data)
        progressed = False
        for item in list(running):
            result = poll_step(item.step)
            if result is None:
                continue
            progressed = True
            data = _advance(item, result, fixtures, time_scale)
            if data is not None:
                running.remove(item)
                finish(item, data)
        if not progressed:
            time.sleep(POLL_S)
    return [outcomes[i] for i in sorted(outcomes)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.stress_inputs", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="Run the cases whose name contains this text.")
    parser.add_argument("--quick", action="store_true", help="Only the handful of cases the test runs.")
    parser.add_argument("--jobs", type=int, default=2, choices=[1, 2, 3, 4], help="Cases at once.")
    parser.add_argument("--time_scale", type=float, default=1.0, help="Multiply every step's timeout.")
    parser.add_argument("--keep", type=Path, default=None, help="Keep the case folders here (default: removed).")
    parser.add_argument("--list", action="store_true", help="List the cases and exit.")
    return parser.parse_args(argv)


def select(cases: list, only: list[str], quick: bool) -> list:
    from .stress_cases import QUICK

    if quick:
        cases = [case for case in cases if case.name in QUICK]
    if only:
        cases = [case for case in cases if any(text in case.name for text in only)]
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(ENVIRONMENT)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from .stress_cases import fixture_cases, fixture_paths, issue_cases
    from .stress_child import preload
    from .stress_hostile import hostile_cases
    from .stress_table import group_table, problem_table, summary_line

    cases = select(issue_cases() + hostile_cases(), args.only, args.quick)
    if args.list:
        print("\n".join(f"{case.group:<9} {case.name}" for case in cases))
        return 0
    started = time.monotonic()
    preload()
    gc.freeze()  # the forked steps then copy fewer of this process's pages (the collector would touch them all)
    logger.info("warm in %.1f s; %d cases", time.monotonic() - started, len(cases))
    root = Path(tempfile.mkdtemp(prefix="stress-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    try:
        fixtures = fixture_paths(root)
        made = run_cases(fixture_cases(), root, fixtures, args.jobs, args.time_scale, by_name=True)
        failed = [outcome for outcome in made if outcome.category != "clean"]
        if failed:
            logger.error("cannot make the fixtures: %s: %s", failed[0].name, failed[0].note)
            return 2
        outcomes = run_cases(cases, root / "cases", fixtures, args.jobs, args.time_scale)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    table = problem_table(outcomes)
    print(group_table(outcomes))
    if table:
        print(table)
    print(f"wall time {time.monotonic() - started:.0f} s")
    print(summary_line(outcomes))
    bad = [o for o in outcomes if o.category in ("traceback", "lost", "hang", "secret")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
