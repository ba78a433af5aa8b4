"""What the peft-built kinds (LoRA, DoRA, LoKr, LoHa) share: the rank, adding the adapter, counting it.

Each kind gives its peft config at a rank (`config_at`); the rank is `--rank`, or with `--match_lora_budget RANK`
the largest rank within a rank-RANK LoRA's parameter count.
"""

from __future__ import annotations

import logging
from abc import abstractmethod

from peft import PeftConfig, inject_adapter_in_model
from torch import nn

from ..budget import count_peft_parameters, peft_rank_for_lora_budget
from ..config import LilyConfig
from ..messages import first_line, is_out_of_memory
from .base import ADAPTER_NAME, AdapterBackend, AdapterError, AdapterOptions, Targets, copy_targets

logger = logging.getLogger(__name__)


class PeftAdapterBackend(AdapterBackend):
    """A kind peft builds from one config: `add` injects it at `rank_for`'s rank; `count_parameters` counts it."""

    @abstractmethod
    def config_at(self, options: AdapterOptions, targets: Targets, rank: int) -> PeftConfig:
        """The peft config at `rank` for these settings and target layers."""

    def inject(self, model: nn.Module, config: PeftConfig) -> None:
        """Add `config`'s adapter to `model` as ADAPTER_NAME, recorded in `model.peft_config` as diffusers'
        add_adapter records it (the saved metadata reads it)."""
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        model.peft_config = {ADAPTER_NAME: config}

    def rank_for(self, model: nn.Module, targets: Targets, options: AdapterOptions) -> int:
        """--rank, or with --match_lora_budget the largest rank within that LoRA rank's parameter count."""
        if options.match_lora_budget is None:
            return options.rank
        scope = LilyConfig(target_modules=copy_targets(targets))
        try:
            return peft_rank_for_lora_budget(
                model, options.match_lora_budget, lambda rank: self.config_at(options, targets, rank), scope
            )
        except ValueError as err:
            raise AdapterError(f"--match_lora_budget {options.match_lora_budget}: {first_line(err)}") from err

    def add(self, model: nn.Module, targets: Targets, options: AdapterOptions, label: str) -> list[nn.Parameter]:
        rank = self.rank_for(model, targets, options)
        config = self.config_at(options, targets, rank)
        try:
            self.inject(model, config)
        except (ValueError, TypeError) as err:
            raise AdapterError(f"cannot add {self.display_name} to the {label}: {first_line(err)}") from err
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            raise AdapterError(
                f"not enough memory for a {self.display_name} of rank {rank}: {first_line(err)}"
            ) from err
        parameters = [p for p in model.parameters() if p.requires_grad]
        logger.info(f"{label}: {self.display_name} rank {rank}, {sum(p.numel() for p in parameters):,} parameters")
        return parameters

    def count_parameters(self, model: nn.Module, targets: Targets, options: AdapterOptions) -> int:
        config = self.config_at(options, targets, self.rank_for(model, targets, options))
        return count_peft_parameters(model, config, LilyConfig(target_modules=copy_targets(targets)))
