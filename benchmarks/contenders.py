"""The adapters `speed.py` compares, each attached to its own copy of one base UNet (weights shared).

A contender is a function `(model, settings) -> Prepared`: it adds its adapter to `model` (a
weight-sharing copy of the base UNet, every base parameter frozen) and says what an optimizer gets,
which parameter is unique to each adapted layer (to check that gradients reach all of them) and
how the adapter is saved.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lily.layer import LilyLayer as PeftLilyLayer
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import save_file
from torch import nn

from lily_diffusion import LilyConfig, add_lily, count_lily_parameters, count_lora_parameters, save_lily_weights

PEFT_ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterSpec:
    """The Lily config every Lily contender uses; LoRA ranks follow from it."""

    r: int = 32
    stride_A: int = 10
    num_B: int = 8
    small_lora_rank: int = 4
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def lily_config(self, routing: str = "sample") -> LilyConfig:
        return LilyConfig(
            r=self.r,
            stride_A=self.stride_A,
            num_B=self.num_B,
            target_modules=list(self.target_modules),
            routing=routing,
        )


@dataclass
class Prepared:
    """One contender, ready to run."""

    key: str
    label: str
    model: nn.Module
    trainable: list[nn.Parameter]
    per_layer: dict[str, nn.Parameter] = field(default_factory=dict)  # adapted layer -> its own parameter
    save: Callable[[Path], Path] | None = None

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable)

    @property
    def unique_parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.trainable)


Contender = Callable[[nn.Module, AdapterSpec], Prepared]


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree that reuses `model`'s parameters and buffers (no new memory)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def matched_lora_rank(model: nn.Module, spec: AdapterSpec) -> int:
    """The LoRA rank whose parameter count is closest to the Lily config's."""
    config = spec.lily_config()
    return max(1, round(count_lily_parameters(model, config) / count_lora_parameters(model, 1, config)))


def unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # parameters() yields shared ones once


def attach_base(model: nn.Module, spec: AdapterSpec) -> Prepared:
    """No adapter: the lower limit (the training step sends gradients to the input instead)."""
    return Prepared("base", "base UNet (no adapter)", model, [])


def attach_ours(model: nn.Module, spec: AdapterSpec, routing: str) -> Prepared:
    adapter = add_lily(model, spec.lily_config(routing))
    per_layer = {path: adapter.lily_router[slot.router_index] for path, slot in adapter.layout.slots.items()}

    def save(directory: Path) -> Path:
        return save_lily_weights(directory, unet=model)

    label = f"ours Lily r{spec.r} ({routing})"
    return Prepared(f"ours-{routing}", label, model, list(adapter.parameters()), per_layer, save)


def attach_peft_lily(model: nn.Module, spec: AdapterSpec) -> Prepared:
    config = peft.LilyConfig(
        r=spec.r, stride_A=spec.stride_A, num_B=spec.num_B, target_modules=list(spec.target_modules)
    )
    inject_adapter_in_model(config, model)
    per_layer = {
        name: module.lily_router["default"].weight
        for name, module in model.named_modules()
        if isinstance(module, PeftLilyLayer)
    }
    return Prepared("peft-lily", f"peft Lily r{spec.r}", model, unique_trainable(model), per_layer, peft_saver(model))


def attach_peft_lora(model: nn.Module, spec: AdapterSpec, rank: int, key: str, label: str) -> Prepared:
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(spec.target_modules))
    inject_adapter_in_model(config, model)
    per_layer = {
        name: module.lora_B["default"].weight
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    return Prepared(key, label, model, unique_trainable(model), per_layer, peft_saver(model))


def peft_saver(model: nn.Module) -> Callable[[Path], Path]:
    """What `PeftModel.save_pretrained` writes: the adapter state dict, shared tensors cloned per key."""

    def save(directory: Path) -> Path:
        state = get_peft_model_state_dict(model)
        path = directory / PEFT_ADAPTER_FILE
        save_file({key: tensor.detach().clone().contiguous().cpu() for key, tensor in state.items()}, path)
        return path

    return save


def registry(model: nn.Module, spec: AdapterSpec) -> dict[str, Contender]:
    """Contender key -> attach function, in the order they run (LoRA ranks computed for `model`)."""
    matched = matched_lora_rank(model, spec)
    small = spec.small_lora_rank
    contenders: dict[str, Contender] = {"base": attach_base}
    if matched == small:
        label = f"peft LoRA r{small} (= matched)"
        contenders["lora-matched"] = lambda m, s: attach_peft_lora(m, s, small, "lora-matched", label)
    else:
        contenders[f"lora-r{small}"] = lambda m, s: attach_peft_lora(
            m, s, small, f"lora-r{small}", f"peft LoRA r{small}"
        )
        label = f"peft LoRA r{matched} (matched)"
        contenders["lora-matched"] = lambda m, s: attach_peft_lora(m, s, matched, "lora-matched", label)
    contenders["peft-lily"] = attach_peft_lily
    contenders["ours-sample"] = lambda m, s: attach_ours(m, s, "sample")
    contenders["ours-batch"] = lambda m, s: attach_ours(m, s, "batch")
    return contenders


def prepare(base: nn.Module, spec: AdapterSpec, key: str, contender: Contender, dtype: torch.dtype) -> Prepared:
    """Attach `contender` to a weight-sharing copy of `base`; trainable weights stay fp32."""
    prepared = contender(weight_sharing_copy(base), spec)
    for parameter in prepared.trainable:
        if parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()  # like diffusers' cast_training_params
    if prepared.key != key:
        raise RuntimeError(f"Contender {key!r} reported key {prepared.key!r}.")
    return prepared
