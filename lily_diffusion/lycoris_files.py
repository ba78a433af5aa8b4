"""LoKr and LoHa (peft's LyCORIS adapters) in one safetensors file per run, and loading one into a pipeline.

diffusers' `load_lora_weights` takes neither, so the file is lily_diffusion's own, with peft's names throughout:
tensor keys are `{component}.{key of peft's get_peft_model_state_dict}` (e.g. `unet.….to_q.lokr_w1`), and the
metadata holds `format` (`lily_diffusion.lycoris`), `adapter` (`lokr` or `loha`) and, per component,
`config.{component}`: the peft config fields as JSON. A file is loaded with peft's own `inject_adapter_in_model` and
`set_peft_model_state_dict`, without the training flags. Strangers' files get bounded work and no code: the
config is checked field by field, the adapted layers are the ones the tensor keys name (no regex from the file is
ever matched), and every tensor's shape is checked against the adapter peft builds, on the meta device, before any
memory is allocated.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import recurse_remove_peft_layers
from peft import LoHaConfig, LoKrConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .patterns import shorten
from .serialization import COMPONENTS, tensors_by_component, write_atomically
from .tensor_files import read_safetensors

FORMAT = "lily_diffusion.lycoris"
CONFIG_KEY_PREFIX = "config."
CONFIG_TYPES: dict[str, type[LoKrConfig] | type[LoHaConfig]] = {"lokr": LoKrConfig, "loha": LoHaConfig}
WEIGHT_NAMES = {"lokr": "pytorch_lokr_weights.safetensors", "loha": "pytorch_loha_weights.safetensors"}
TENSOR_MARKERS = {"lokr": ".lokr_", "loha": ".hada_"}  # what each kind's peft parameter names contain
MAX_RANK = 65_536  # far above any real adapter; a larger r in a file is refused before peft sees it
# The config fields a file may hold, each with its JSON type(s); everything else is refused.
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,),
    "alpha": (int, float),
    "rank_dropout": (int, float),
    "module_dropout": (int, float),
    "rank_dropout_scale": (bool,),
    "init_weights": (bool,),
    "decompose_both": (bool,),
    "decompose_factor": (int,),
}
KIND_FIELDS = {"loha": ("r", "alpha", "rank_dropout", "module_dropout", "init_weights")}
KIND_FIELDS["lokr"] = (*KIND_FIELDS["loha"], "rank_dropout_scale", "decompose_both", "decompose_factor")


class LycorisFileError(ValueError):
    """A LoKr/LoHa file that cannot be used: unreadable, malformed, or not for this model (one sentence)."""


@dataclass(frozen=True)
class LycorisComponent:
    """One component's part of a file: its peft config and tensors (keys without the component prefix)."""

    config: LoKrConfig | LoHaConfig
    tensors: dict[str, torch.Tensor]


def config_fields(config: LoKrConfig | LoHaConfig, kind: str) -> dict[str, object]:
    """The fields of `config` a file keeps (the layers adapted are named by the tensor keys)."""
    return {name: getattr(config, name) for name in KIND_FIELDS[kind]}


def save_lycoris_weights(
    directory: Path, kind: str, models: Mapping[str, nn.Module], adapter_name: str = "default"
) -> Path:
    """Write every model's `adapter_name` adapter (its config read from `model.peft_config`) into one file."""
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": FORMAT, "adapter": kind}
    for component, model in models.items():
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        tensors.update({f"{component}.{key}": value.detach().contiguous() for key, value in state.items()})
        fields = config_fields(model.peft_config[adapter_name], kind)
        metadata[CONFIG_KEY_PREFIX + component] = json.dumps(fields, sort_keys=True)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / WEIGHT_NAMES[kind]
    write_atomically(target, tensors, metadata)
    return target


def file_kind(metadata: Mapping[str, str]) -> str | None:
    """`lokr` or `loha` for a file of this format (by its metadata), else None."""
    kind = metadata.get("adapter")
    return kind if metadata.get("format") == FORMAT and kind in CONFIG_TYPES else None


def parse_config(kind: str, text: str, where: str) -> LoKrConfig | LoHaConfig:
    """A peft config from a file's JSON, each field checked; LycorisFileError in one sentence otherwise."""
    try:
        values = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise LycorisFileError(f"{where} is not valid JSON.") from None
    if not isinstance(values, dict):
        raise LycorisFileError(f"{where} must be a JSON object, got {type(values).__name__}.")
    unknown = sorted(set(values) - set(KIND_FIELDS[kind]))
    if unknown:
        raise LycorisFileError(f"{where} has fields a {kind} file does not take: {shorten(unknown)}.")
    for name, value in values.items():
        if (isinstance(value, bool) and bool not in FIELD_TYPES[name]) or not isinstance(value, FIELD_TYPES[name]):
            raise LycorisFileError(f"{where}: {name} has the wrong type ({shorten(value)}).")
        if isinstance(value, float) and not math.isfinite(value):
            raise LycorisFileError(f"{where}: {name} must be finite, got {value}.")
    if "r" not in values or not 1 <= values["r"] <= MAX_RANK:
        raise LycorisFileError(f"{where}: r must be an integer from 1 to {MAX_RANK}, got {values.get('r')!r}.")
    for name in ("rank_dropout", "module_dropout"):
        if not 0 <= values.get(name, 0) < 1:
            raise LycorisFileError(f"{where}: {name} must be in [0, 1), got {values[name]!r}.")
    try:
        return CONFIG_TYPES[kind](**values)
    except (TypeError, ValueError) as error:
        raise LycorisFileError(f"{where} is not a valid {kind} config: {shorten(error)}.") from None


def _check_kind(path: Path, metadata: dict[str, str], keys: list[str]) -> None:
    """Refuse a file whose metadata does not name a LoKr/LoHa kind (before its tensors are read)."""
    if file_kind(metadata) is None:
        raise LycorisFileError(f"{path} is not a lily_diffusion LoKr/LoHa file (its metadata says otherwise).")


def read_lycoris_file(path: str | os.PathLike[str]) -> tuple[str, dict[str, LycorisComponent]]:
    """The kind and components of a LoKr/LoHa file, every config and tensor checked (nothing is loaded into a
    model)."""
    metadata, tensors = read_safetensors(Path(path), LycorisFileError, _check_kind)
    kind = file_kind(metadata)  # not None: _check_kind refused the file otherwise
    components: dict[str, LycorisComponent] = {}
    parts = tensors_by_component(tensors, metadata, CONFIG_KEY_PREFIX, str(path), LycorisFileError)
    for component, own, text in parts:
        config = parse_config(kind, text, f"{path}: the {component} config")
        check_values(own, f"{path} ({component})")
        components[component] = LycorisComponent(config, own)
    stray = sorted(key for key in tensors if not key.startswith(tuple(f"{c}." for c in components)))
    if stray or not components:
        raise LycorisFileError(f"{path} has tensors outside its components, or no component: {shorten(stray)}.")
    return kind, components


def check_values(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Every tensor floating point and finite (in float32, the trained precision); LycorisFileError otherwise."""
    for key, tensor in tensors.items():
        if not tensor.dtype.is_floating_point or not torch.isfinite(tensor.to(torch.float32)).all():
            raise LycorisFileError(
                f"{where}: tensor {shorten(key)} is not floating point or holds NaN or infinity (a diverged run?)."
            )


def adapted_layers(kind: str, tensors: Mapping[str, torch.Tensor], where: str) -> list[str]:
    """The module paths a component's tensor keys name (`{path}{marker}…`); every key must name one."""
    marker = TENSOR_MARKERS[kind]
    paths = {key.rpartition(marker)[0] for key in tensors}
    if "" in paths or any(marker not in key for key in tensors):
        odd = next(key for key in tensors if marker not in key or key.startswith(marker))
        raise LycorisFileError(f"{where} has a key that is no {kind} weight of a layer: {shorten(odd)}.")
    return sorted(paths)


def attach_lycoris(
    model: nn.Module, kind: str, part: LycorisComponent, adapter_name: str, where: str
) -> list[nn.Parameter]:
    """Add `part` to `model` as adapter `adapter_name` (peft's inject + set_peft_model_state_dict), after checking
    that its layers exist and are Linear and its tensors have exactly the shapes peft builds; nothing is changed
    when a check fails."""
    layers = adapted_layers(kind, part.tensors, where)
    modules = dict(model.named_modules())
    for path in layers:
        if not isinstance(modules.get(path), nn.Linear):
            raise LycorisFileError(f"{where} adapts {shorten(path)}, which is no Linear layer of this model.")
    first = next(iter(model.parameters()))
    config = part.config.__class__(**{**config_fields(part.config, kind), "target_modules": layers})
    expected = expected_shapes(config, kind, [modules[path] for path in layers], layers)
    found = {key: tuple(tensor.shape) for key, tensor in part.tensors.items()}
    if found != expected:
        differing = sorted(set(found.items()) ^ set(expected.items()))[0][0]
        raise LycorisFileError(
            f"{where} does not fit this model with its config (r={config.r}): {shorten(differing)} is missing, "
            "extra, or of another shape."
        )
    inject_adapter_in_model(config, model, adapter_name=adapter_name, low_cpu_mem_usage=True)
    state = {key: tensor.to(device=first.device, dtype=first.dtype) for key, tensor in part.tensors.items()}
    set_peft_model_state_dict(model, state, adapter_name=adapter_name, low_cpu_mem_usage=True)
    return [p for name, p in model.named_parameters() if f".{adapter_name}" in name and TENSOR_MARKERS[kind] in name]


def expected_shapes(
    config: LoKrConfig | LoHaConfig, kind: str, bases: list[nn.Linear], paths: list[str]
) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes peft gives `config` on these layers (built on the meta device: no memory)."""
    with torch.device("meta"):
        skeleton = nn.Module()
        for index, base in enumerate(bases):
            skeleton.add_module(f"layer{index}", nn.Linear(base.in_features, base.out_features, bias=False))
    names = [f"layer{index}" for index in range(len(bases))]
    layer_config = config.__class__(**{**config_fields(config, kind), "target_modules": names})
    inject_adapter_in_model(layer_config, skeleton, adapter_name="shapes", low_cpu_mem_usage=True)
    shapes = {}
    for key, tensor in get_peft_model_state_dict(skeleton, adapter_name="shapes").items():
        layer, _, rest = key.partition(".")
        shapes[f"{paths[int(layer[len('layer') :])]}.{rest}"] = tuple(tensor.shape)
    return shapes


def load_lycoris_weights(
    pipeline: StableDiffusionXLPipeline, path: str | os.PathLike[str], adapter_name: str = "default"
) -> str:
    """Load a LoKr/LoHa file (or the folder holding one) into `pipeline`'s components; returns its kind."""
    path = resolve_lycoris_path(path)
    kind, components = read_lycoris_file(path)
    missing = [name for name in components if not isinstance(getattr(pipeline, name, None), nn.Module)]
    if missing:
        raise LycorisFileError(f"{path} has weights for {', '.join(missing)}, which this pipeline lacks.")
    for component, part in components.items():
        attach_lycoris(getattr(pipeline, component), kind, part, adapter_name, f"{path} ({component})")
    return kind


def resolve_lycoris_path(path: str | os.PathLike[str]) -> Path:
    """The file itself, or the LoKr/LoHa weight file in a folder; FileNotFoundError in one sentence."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in WEIGHT_NAMES.values() if (path / name).is_file()]
        if len(found) != 1:
            names = " or ".join(WEIGHT_NAMES.values())
            raise FileNotFoundError(f"{path} holds {'no' if not found else 'more than one'} {names}.")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"No LoKr/LoHa weights file at {path}.")
    return path


def unload_lycoris_weights(pipeline: StableDiffusionXLPipeline, adapter_name: str) -> None:
    """Remove adapter `adapter_name` from every component (peft's per-layer `delete_adapter`); a component left
    with no peft adapter at all gets its plain layers back (diffusers' `recurse_remove_peft_layers`)."""
    for component in COMPONENTS:
        model = getattr(pipeline, component, None)
        if not isinstance(model, nn.Module):
            continue
        layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
        for layer in layers:
            if adapter_name in layer._get_available_adapters():
                layer.delete_adapter(adapter_name)
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, dict):  # what peft's inject recorded on the model
            configs.pop(adapter_name, None)
            if not configs:
                del model.peft_config
        if layers and not any(layer._get_available_adapters() for layer in layers):
            recurse_remove_peft_layers(model)
