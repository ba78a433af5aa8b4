"""Checkpoints through accelerate's save_state/load_state, written so that a kill at any moment loses nothing.

Each `output_dir/checkpoint-N/` holds the adapter file (the same format as the final output, so any checkpoint
can be loaded into a pipeline), the optimizer, scheduler and RNG states, the run's step, seed and batch layout, and
`checkpoint_complete.json`: the list of its files with their sizes, written last. A checkpoint is first written to
`checkpoint-N.partial/` and renamed into place once complete; old checkpoints are pruned only after that (renamed to
`checkpoint-N.removing/`, then deleted). Folders left by an interrupted save are ignored and removed at the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from ..backends import BACKENDS, AdapterBackend, AdapterError
from ..messages import first_line
from .adapters import AdaptedModels
from .errors import TrainingError

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LEFTOVER_PATTERN = re.compile(r"^checkpoint-\d+\.(partial|removing)$")
PARTIAL_SUFFIX = ".partial"
REMOVING_SUFFIX = ".removing"
MARKER_NAME = "checkpoint_complete.json"
MAX_MARKER_BYTES = 1 << 20
# what accelerate wrote into every checkpoint before completion markers existed
LEGACY_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl")
RUN_LAYOUT_KEYS = ("train_batch_size", "gradient_accumulation_steps", "num_processes")
# what a failed write raises: the OS, torch.save's writer, safetensors
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


class TrainState:
    """The run's progress, saved in every checkpoint (registered with `accelerate.register_for_checkpointing`).

    `run_layout` (batch size, accumulation, processes) is saved too; after a load, `saved_run_layout` holds the
    checkpoint's values (empty for checkpoints written before it was stored).
    """

    def __init__(self, seed: int, global_step: int = 0, run_layout: dict[str, int] | None = None) -> None:
        self.seed = seed
        self.global_step = global_step
        self.run_layout = dict(run_layout or {})
        self.saved_run_layout: dict[str, int] = {}
        self.last_checkpoint: Path | None = None

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "global_step": self.global_step, **self.run_layout}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.global_step = int(state["global_step"])
        self.saved_run_layout = {key: int(state[key]) for key in RUN_LAYOUT_KEYS if key in state}


def run_layout_changes(saved: dict[str, int], current: dict[str, int]) -> list[str]:
    """'name saved -> current' for every layout value that differs (values missing on either side are skipped)."""
    shared = [key for key in RUN_LAYOUT_KEYS if key in saved and key in current]
    return [f"{key} {saved[key]} -> {current[key]}" for key in shared if saved[key] != current[key]]


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` in `output_dir` (complete or not), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def leftovers(output_dir: str | Path) -> list[Path]:
    """Folders an interrupted save or prune left in `output_dir` (`checkpoint-N.partial`, `checkpoint-N.removing`)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(child for child in folder.iterdir() if child.is_dir() and LEFTOVER_PATTERN.match(child.name))


def _read_manifest(marker: Path) -> dict[str, object] | None:
    """The completion marker's content, or None when it is not a small, well-formed manifest."""
    if marker.stat().st_size > MAX_MARKER_BYTES:
        return None
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        return None
    for name, size in files.items():
        parts = Path(name).parts
        if not isinstance(size, int) or not parts or Path(name).is_absolute() or ".." in parts:
            return None
    return manifest


def _legacy_problem(folder: Path) -> str | None:
    """For a folder without a marker: which of accelerate's files (or the adapter file) is missing or empty."""

    def present(name: str) -> bool:
        path = folder / name
        return path.is_file() and path.stat().st_size > 0

    missing = [name for name in LEGACY_FILES if not present(name)]
    if not any(present(backend.weight_name) for backend in BACKENDS.values()):
        missing.append("the adapter file")
    if missing:
        return f"it has no {MARKER_NAME} and {', '.join(missing)} missing or empty (an interrupted save)"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be resumed from (a reason for a message), or None when it is complete.

    Complete means: its marker lists every file with the size it was written with. A folder from before markers
    existed counts as complete when accelerate's files and the adapter file are all there and non-empty.
    """
    folder = Path(folder)
    marker = folder / MARKER_NAME
    if not marker.is_file():
        return _legacy_problem(folder)
    manifest = _read_manifest(marker)
    if manifest is None:
        return f"its {MARKER_NAME} is malformed"
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return None


def checkpoint_step(folder: str | Path) -> int | None:
    """The step a checkpoint was saved at: from its marker, else from its `checkpoint-N` name, else None."""
    folder = Path(folder)
    marker = folder / MARKER_NAME
    manifest = _read_manifest(marker) if marker.is_file() else None
    if manifest is not None:
        return int(manifest["step"])
    match = CHECKPOINT_PATTERN.match(folder.name)
    return int(match.group(1)) if match else None


def recorded_bytes(folder: Path | None) -> int:
    """What a complete checkpoint's files take, from its marker (0 when unknown)."""
    marker = folder / MARKER_NAME if folder is not None else None
    manifest = _read_manifest(marker) if marker is not None and marker.is_file() else None
    return sum(manifest["files"].values()) if manifest is not None else 0


def _checked(path: Path) -> Path:
    """`path` if it is a complete checkpoint (a warning for one without marker), else a one-line error."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(f"cannot resume from {path}: it is incomplete ({problem})")
    if not (path / MARKER_NAME).is_file():
        logger.warning(f"{path} has no {MARKER_NAME} (saved by an older version); its files are all there")
    return path


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> Path | None:
    """The folder to resume from: 'latest' (the newest complete one; None if there is no checkpoint yet) or a path,
    absolute or in output_dir. Incomplete checkpoints are skipped by 'latest' and refused by name."""
    if value is None:
        return None
    folder = Path(output_dir)
    for leftover in leftovers(folder):
        logger.warning(f"ignoring {leftover}: left by an interrupted save (removed at the next checkpoint)")
    if value == "latest":
        skipped = []
        for _, path in reversed(list_checkpoints(folder)):
            problem = checkpoint_problem(path)
            if problem is None:
                return _checked(path)
            logger.warning(f"skipping {path}: {problem}")
            skipped.append(path.name)
        if skipped:
            raise TrainingError(
                f"--resume_from_checkpoint latest: {folder} has no complete checkpoint (incomplete: "
                f"{', '.join(skipped)}); start over with --overwrite_output_dir instead of --resume_from_checkpoint"
            )
        logger.warning(f"no checkpoint in {folder}; starting a new training run")
        return None
    for candidate in (Path(value), folder / Path(value).name):
        if candidate.is_dir():
            return _checked(candidate)
    raise TrainingError(f"--resume_from_checkpoint {value} does not exist")


def check_resume_step(path: Path, step: int | None, max_train_steps: int | None) -> None:
    """A one-line error when the run would end before the checkpoint it resumes from."""
    if step is not None and max_train_steps is not None and max_train_steps < step:
        raise TrainingError(
            f"--max_train_steps {max_train_steps} is below the step of {path} ({step}): nothing is left to train; "
            "raise --max_train_steps or resume from an earlier checkpoint"
        )


def _fsync(path: Path) -> None:
    """Flush a file (or, where the OS allows, a folder) to the disk."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        if path.is_file():
            raise
    finally:
        os.close(descriptor)


def write_marker(folder: Path, step: int) -> None:
    """Flush every file of `folder`, then write the completion marker listing them with their sizes."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MARKER_NAME)
    for path in files:
        _fsync(path)
    manifest = {"step": step, "files": {path.relative_to(folder).as_posix(): path.stat().st_size for path in files}}
    marker = folder / MARKER_NAME
    with marker.open("w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _retire(path: Path) -> Path:
    """Rename a checkpoint out of the `checkpoint-N` names (atomic), so that deleting it is never seen half done."""
    retired = path.with_name(path.name + REMOVING_SUFFIX)
    if retired.exists():
        shutil.rmtree(retired)
    os.replace(path, retired)
    return retired


def publish(partial: Path, final: Path) -> None:
    """Rename a complete `checkpoint-N.partial` to `checkpoint-N` (replacing an older one of the same step)."""
    retired = _retire(final) if final.exists() else None
    os.replace(partial, final)
    _fsync(final.parent)
    if retired is not None:
        shutil.rmtree(retired)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Keep the newest `total_limit` complete checkpoints; delete every checkpoint older than the oldest one kept.

    Called after a new checkpoint is complete, so the last resumable state is never the one deleted.
    """
    if total_limit is None:
        return []
    existing = list_checkpoints(output_dir)
    complete = [step for step, path in existing if checkpoint_problem(path) is None]
    if len(complete) <= total_limit:
        return []
    oldest_kept = complete[-total_limit]
    removed = [path for step, path in existing if step < oldest_kept]
    for path in removed:
        logger.info(f"removing old checkpoint {path} (--checkpoints_total_limit {total_limit})")
        shutil.rmtree(_retire(path))
    return removed


def remove_leftovers(output_dir: str | Path) -> None:
    """Delete the folders an interrupted save or prune left behind."""
    for path in leftovers(output_dir):
        logger.info(f"removing {path}, left by an interrupted save")
        shutil.rmtree(path, ignore_errors=True)


def attempt(action: Callable[[], object]) -> str | None:
    """Run a write; None on success, else the first line of what failed (disk full, file too large, ...)."""
    try:
        action()
    except SAVE_ERRORS as err:
        return first_line(err)
    return None


def agree_on_failure(error: str | None) -> str | None:
    """Collective (every process calls it): the first process's error, if any process failed, so that all stop
    together instead of some waiting forever for the others."""
    return next((e for e in gather_object([error]) if e is not None), None)


def format_bytes(count: int) -> str:
    """A byte count for people: '512 bytes', '242 kB', '3.20 GB'."""
    if count < 1000:
        return f"{count} bytes"
    text = tqdm.format_sizeof(count, "B")
    return f"{text[:-2]} {text[-2:]}"


def write_failure_message(what: str, folder: Path, error: str, needed_bytes: int, last: Path | None) -> str:
    """The one line for a save that failed (disk full, file too large): space needed, space free, what is intact."""
    try:
        free = f"{format_bytes(shutil.disk_usage(folder).free)} are free"
    except OSError:
        free = "the free space is unknown"
    earlier = (
        f"the earlier checkpoints are intact; the last complete one is {last}"
        if last is not None
        else "no checkpoint had been saved before"
    )
    return (
        f"cannot write {what} in {folder}: it needs about {format_bytes(needed_bytes)}, {free} ({error}); "
        f"nothing partial was left behind; {earlier}"
    )


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, state: TrainState, total_limit: int | None, needed_bytes: int
) -> Path:
    """Save the state on every process into `checkpoint-N.partial`; the main process marks it complete, renames
    it to `checkpoint-N`, then prunes. A failed write (disk full) removes the partial folder and raises a one-line
    TrainingError on every process, saying about how much space a checkpoint needs (`needed_bytes`, or the size of
    the last checkpoint if larger). Returns the checkpoint folder."""
    folder = Path(output_dir)
    final = folder / f"checkpoint-{state.global_step}"
    partial = folder / f"{final.name}{PARTIAL_SUFFIX}"
    if accelerator.is_main_process:
        remove_leftovers(folder)
    accelerator.wait_for_everyone()
    error = agree_on_failure(attempt(lambda: accelerator.save_state(str(partial))))
    if error is None and accelerator.is_main_process:
        error = attempt(lambda: (write_marker(partial, state.global_step), publish(partial, final)))
    error = agree_on_failure(error)
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        needed = max(needed_bytes, recorded_bytes(state.last_checkpoint))  # the last one's size: the best guess
        raise TrainingError(write_failure_message(final.name, folder, error, needed, state.last_checkpoint))
    if accelerator.is_main_process:
        try:
            prune_checkpoints(folder, total_limit)
        except OSError as err:  # the new checkpoint is complete: a failed clean-up loses nothing
            logger.warning(f"could not remove old checkpoints: {err}")
    accelerator.wait_for_everyone()
    state.last_checkpoint = final
    logger.info(f"saved {final}")
    return final


def load_adapter_weights_in_place(backend: AdapterBackend, directory: str | Path, adapted: AdaptedModels) -> None:
    """Restore the adapter weights of a checkpoint folder into the models being trained."""
    directory = Path(directory)
    if not (directory / backend.weight_name).is_file():
        raise TrainingError(f"checkpoint {directory} has no {backend.weight_name} (trained with another adapter?)")
    try:
        backend.load_in_place(directory, adapted.components())
    except AdapterError as err:
        raise TrainingError(str(err)) from err


def register_adapter_hooks(accelerator: Accelerator, backend: AdapterBackend, adapted: AdaptedModels) -> None:
    """Make save_state write only the adapter file, and load_state restore it into the live parameters."""
    ours = [id(model) for model in adapted.components().values()]

    def is_ours(model: nn.Module) -> bool:
        return id(accelerator.unwrap_model(model)) in ours

    def save_hook(models: list[nn.Module], weights: list[dict[str, object]], output_dir: str) -> None:
        if accelerator.is_main_process:
            backend.save(Path(output_dir), adapted.components())
        for index in reversed(range(len(models))):
            if is_ours(models[index]) and index < len(weights):
                weights.pop(index)  # accelerate would otherwise save the whole base model

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        load_adapter_weights_in_place(backend, input_dir, adapted)
        for index in reversed(range(len(models))):
            if is_ours(models[index]):
                models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
