"""DreamBooth training of Lily (or LoRA) adapters for SDXL; `train_dreambooth_lily.py` is the entry point."""

from .args import build_parser, options_from_args, parse_args, parse_options
from .errors import TrainingError
from .options import TrainingOptions
from .trainer import run_training

__all__ = [
    "TrainingError",
    "TrainingOptions",
    "build_parser",
    "options_from_args",
    "parse_args",
    "parse_options",
    "run_training",
]
