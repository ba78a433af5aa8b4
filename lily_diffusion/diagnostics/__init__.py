"""What a trained Lily adapter learned: router selectivity, effective rank of its updates, expert use.

`lily-inspect` (`python -m lily_diffusion.diagnostics`) is the command; the modules below are its parts:
`stats` (pure math), `weights` (a Lily file alone), `lora` (a LoRA file to compare with), `collect`
(expert mixes on real prompts), `analysis` (per-layer findings), `report` (table, JSON, PNGs).
"""

from .analysis import ExpertUse, LayerAnalysis, analyse_layers, expert_use
from .collect import Activations, collect_mixes
from .lora import LoraFileError, read_lora_file
from .stats import effective_rank, entropy, lily_stacked_singular_values, tv_spread
from .weights import lily_weight_stats

__all__ = [
    "Activations",
    "ExpertUse",
    "LayerAnalysis",
    "LoraFileError",
    "analyse_layers",
    "collect_mixes",
    "effective_rank",
    "entropy",
    "expert_use",
    "lily_stacked_singular_values",
    "lily_weight_stats",
    "read_lora_file",
    "tv_spread",
]
