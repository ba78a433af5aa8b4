"""Where the workbench's bundled files live: the one module that knows the repository layout.

The workbench (`toyworld`, `benchmarks`, `scripts`) runs from a source checkout; `lily_diffusion`, the library,
never reads a repository path.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
BASE_MODEL_DIR = ASSETS / "toy-sdxl-base"
EVALUATOR_DIR = ASSETS / "toy-evaluator"
SAMPLES = REPO / "samples"
SUBJECTS_DIR = SAMPLES / "subjects"  # one folder per subject: samples/subjects/<name>/
SUBJECT_DIR = SUBJECTS_DIR / "star"  # the default subject's
RESULTS = REPO / "benchmarks" / "results"
TRAIN_SCRIPT = REPO / "train_dreambooth_lily.py"
