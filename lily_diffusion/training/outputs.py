"""What the run leaves in --output_dir: secrets kept out of it, the files an upload may take, an earlier run's files.

Flags whose name contains token, password, key or secret are secrets: their values are replaced by `<redacted>`
wherever the flags are written (training_args.json, tracker hyperparameters). An upload takes an explicit list of
files (final weights, training_args.json, validation images, README.md), never checkpoints, logs or temporary files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from accelerate.logging import get_logger

from ..backends import ALL_WEIGHT_NAMES
from ..messages import first_line
from .checkpointing import leftovers, list_checkpoints
from .errors import TrainingError
from .model_card import write_run_card
from .options import OutputOptions, TrainingOptions

logger = get_logger(__name__)

SECRET_WORDS = ("token", "password", "key", "secret")
REDACTED = "<redacted>"
VALIDATION_FOLDER = "validation"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def is_secret_flag(name: str) -> bool:
    """True for a flag whose value must never be written: its name contains token, password, key or secret."""
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def redacted_flags(flags: Mapping[str, object]) -> dict[str, object]:
    """Every flag's value, with secrets (that were given) replaced by `<redacted>`."""
    return {name: REDACTED if value is not None and is_secret_flag(name) else value for name, value in flags.items()}


def redact_text(text: str, secrets: list[str | None]) -> str:
    """`text` with every given secret value replaced by `<redacted>` (for messages from libraries)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def upload_selection(output_dir: str | Path, weight_names: list[str]) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of the files an upload takes from `output_dir`: the final weight
    files that exist, training_args.json, README.md, and the images directly in validation/."""
    folder = Path(output_dir)
    chosen = [name for name in [*weight_names, "training_args.json", "README.md"] if (folder / name).is_file()]
    validation = folder / VALIDATION_FOLDER
    if validation.is_dir():
        chosen += [
            f"{VALIDATION_FOLDER}/{path.name}"
            for path in validation.iterdir()
            if path.is_file() and not path.is_symlink() and path.suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(chosen)


def previous_run(output_dir: str | Path, weight_names: list[str]) -> list[Path]:
    """An earlier run's results in `output_dir` that a new run would overwrite or mix with: its final weight files
    and `checkpoint-N` folders."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [folder / name for name in weight_names if (folder / name).exists()]
    return sorted(found + [path for _, path in list_checkpoints(folder)])


def previous_run_outputs(output_dir: str | Path, weight_names: list[str], logging_dir: str) -> list[Path]:
    """What --overwrite_output_dir removes: `previous_run`, folders left by an interrupted save, and the validation
    images and tracker logs when they are inside `output_dir` (so the new run's images and curves are its own)."""
    folder = Path(output_dir)
    found = previous_run(folder, weight_names) + leftovers(folder)
    for extra in (folder / VALIDATION_FOLDER, folder / logging_dir):
        inside = extra.resolve().is_relative_to(folder.resolve()) and extra.resolve() != folder.resolve()
        if inside and extra.exists():
            found.append(extra)
    return sorted(found)


def describe(paths: list[Path], limit: int = 4) -> str:
    """'a, b, c and 2 more' from the paths' names."""
    names = [path.name for path in paths]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def remove_paths(paths: list[Path], reason: str) -> None:
    """Delete files and folders, logging each one with `reason`."""
    for path in paths:
        logger.info(f"{reason}: removing {path}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def write_training_args(options: TrainingOptions) -> None:
    """output_dir/training_args.json with every flag as the user passed it (secrets redacted)."""
    folder = Path(options.output.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(redacted_flags(options.flags()), indent=2, sort_keys=True) + "\n"
    (folder / "training_args.json").write_text(text)


def tracker_config(options: TrainingOptions) -> dict[str, object]:
    """Flags as TensorBoard hparams accept them (scalars and strings only; secrets redacted)."""
    flags = redacted_flags(options.flags())
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flags.items()}


def check_output_dir(output: OutputOptions, resuming: bool) -> None:
    """Refuse to start a new run over another run's weights or checkpoints, unless --overwrite_output_dir."""
    found = previous_run(output.output_dir, list(ALL_WEIGHT_NAMES))
    if not found or output.overwrite_output_dir or resuming:
        return
    if output.resume_from_checkpoint is not None:
        advice = "it has no checkpoint to resume from; pass --overwrite_output_dir to replace it"
    else:
        advice = "pass --overwrite_output_dir to replace it, --resume_from_checkpoint latest to continue it"
    raise TrainingError(
        f"--output_dir {output.output_dir} already holds another training run ({describe(found)}); {advice}, "
        "or choose another --output_dir"
    )


def clear_output_dir(output: OutputOptions) -> None:
    """--overwrite_output_dir: remove the previous run's weights, checkpoints, validation images and logs."""
    found = previous_run_outputs(output.output_dir, list(ALL_WEIGHT_NAMES), output.logging_dir)
    remove_paths(found, "--overwrite_output_dir")


def push_to_hub(options: TrainingOptions, weight_names: list[str]) -> None:
    """Upload the final weights, training_args.json, validation images and README.md to --hub_model_id (never
    checkpoints, logs or temporary files)."""
    output = options.output
    from huggingface_hub import CommitOperationAdd, create_commit, create_repo

    try:
        repo = create_repo(output.hub_model_id or Path(output.output_dir).name, exist_ok=True, token=output.hub_token)
        write_run_card(options, repo.repo_id)  # the card's snippet loads the repo
        files = upload_selection(output.output_dir, weight_names)
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(output.output_dir, name))) for name in files
        ]
        create_commit(repo.repo_id, operations, commit_message="End of training", token=output.hub_token)
    except Exception as err:  # network, auth: report, do not crash with a traceback
        message = redact_text(first_line(err), [output.hub_token])
        raise TrainingError(f"push to hub failed: {message}") from err
    logger.info(f"uploaded {', '.join(files)} to {repo.repo_id}")
