"""Lily adapters (Low-Rank Interconnected Adaptation across Layers) for diffusers models."""

from .adapter import LilyAdapter, add_lily, remove_lily
from .budget import (
    count_lily_parameters,
    count_lora_parameters,
    count_peft_parameters,
    lily_config_for_lora_budget,
    peft_rank_for_lora_budget,
)
from .config import LilyConfig
from .layer import LilyMergeError
from .lycoris_files import LycorisFileError, load_lycoris_weights, unload_lycoris_weights
from .peft_export import export_peft_lily
from .peft_import import import_peft_lily
from .pipeline import (
    disable_lily,
    enable_lily,
    fuse_lily,
    load_lily_weights,
    set_lily_adapter,
    set_lily_adapters,
    set_lily_scale,
    unload_lily_weights,
)
from .serialization import WEIGHTS_NAME, LilyFileError, lily_state_dict, save_lily_weights

__all__ = [
    "WEIGHTS_NAME",
    "LilyAdapter",
    "LilyConfig",
    "LilyFileError",
    "LilyMergeError",
    "LycorisFileError",
    "add_lily",
    "count_lily_parameters",
    "count_lora_parameters",
    "count_peft_parameters",
    "disable_lily",
    "enable_lily",
    "export_peft_lily",
    "fuse_lily",
    "import_peft_lily",
    "lily_config_for_lora_budget",
    "lily_state_dict",
    "load_lily_weights",
    "load_lycoris_weights",
    "peft_rank_for_lora_budget",
    "remove_lily",
    "save_lily_weights",
    "set_lily_adapter",
    "set_lily_adapters",
    "set_lily_scale",
    "unload_lily_weights",
    "unload_lycoris_weights",
]
