"""Running the training script as a child process the tests can limit, watch and kill."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.training.conftest import SCRIPT, cli_environment

PROMPT = "a photo of sks square"


def command(args: Sequence[object]) -> list[str]:
    """`python train_dreambooth_lily.py ARGS` (no launcher: a signal reaches the training process itself)."""
    return [sys.executable, str(SCRIPT), *(str(a) for a in args)]


def file_size_limit(max_bytes: int) -> Callable[[], None]:
    """For `preexec_fn`: no file the child writes may grow past `max_bytes` (writes fail with EFBIG instead of
    killing it with SIGXFSZ), the way a full disk makes them fail."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def run(args: Sequence[object], hf_home: Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """Run the training to its end (optionally under a file size limit)."""
    preexec = file_size_limit(max_file_bytes) if max_file_bytes is not None else None
    return subprocess.run(
        command(args), env=cli_environment(hf_home), capture_output=True, text=True, timeout=300, preexec_fn=preexec
    )


def start(args: Sequence[object], hf_home: Path, log: Path) -> subprocess.Popen:
    """Start the training in the background; its output goes to `log` (a pipe could fill up and block it)."""
    with log.open("w") as handle:
        return subprocess.Popen(command(args), env=cli_environment(hf_home), stdout=handle, stderr=subprocess.STDOUT)


def last_line(text: str) -> str:
    """The last non-empty line of a run's output."""
    return text.strip().splitlines()[-1]
