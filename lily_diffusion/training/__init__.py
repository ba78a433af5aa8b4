"""DreamBooth training of Lily (or LoRA) adapters for SDXL; `train_dreambooth_lily.py` is the entry point."""

from .args import build_parser, parse_args
from .errors import TrainingError
from .trainer import run_training

__all__ = ["TrainingError", "build_parser", "parse_args", "run_training"]
