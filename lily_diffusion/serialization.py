"""The one-copy safetensors format: every shared tensor stored once, readable keys, the config in the metadata,
strict checks when reading.

Keys, below a component prefix (`unet.`, `text_encoder.`, `text_encoder_2.`):
  `{leader module path}.lily_A.weight`   an A, named after the first layer it serves   [r, in]
  `{target}@{out}x{in}.lily_B`           a group's expert pool                         [num_B, r, out]
  `{module path}.lily_router.weight`     one router per layer                          [num_B, r]
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter import LilyAdapter, add_lily, get_lily_adapter, lily_adapters, remove_lily
from .config import LilyConfig
from .lora_files import is_lora_file
from .patterns import shorten
from .sharing import LilyLayout, build_layout
from .tensor_files import read_safetensors

WEIGHTS_NAME = "pytorch_lily_weights.safetensors"
FORMAT = "lily_diffusion"
FORMAT_VERSION = "1"
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
CONFIG_KEY_PREFIX = "lily_config."
STATE_DICT_CONFIG_KEY = "lily_config"


class LilyFileError(ValueError):
    """A Lily weights file that cannot be used: unreadable, of another format, or not for this model."""


class LilyStateDict(dict[str, torch.Tensor]):
    """One adapter's tensors under their file keys (no component prefix), plus `metadata`: the file header's
    strings for it, `{"format": "lily_diffusion", "format_version": "1", "lily_config": <LilyConfig JSON>}`."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        super().__init__(tensors)
        self.metadata = dict(metadata)


@dataclass(frozen=True)
class LilyComponentWeights:
    """The part of a Lily file for one pipeline component."""

    config: LilyConfig
    tensors: dict[str, torch.Tensor]


def layout_tensors(adapter: LilyAdapter) -> Iterator[tuple[str, nn.Parameter]]:
    """`(key, parameter)` for each unique parameter of the adapter, keyed as in the file."""
    layout = adapter.layout
    for index, leader in enumerate(layout.a_leaders()):
        yield f"{leader}.lily_A.weight", adapter.lily_A[index]
    for index, group in enumerate(layout.groups):
        yield f"{group.key}.lily_B", adapter.lily_B[index]
    for path, slot in layout.slots.items():
        yield f"{path}.lily_router.weight", adapter.lily_router[slot.router_index]


def expected_shapes(layout: LilyLayout, config: LilyConfig) -> dict[str, tuple[int, ...]]:
    """The keys and shapes a file must hold for `config` on a model with this layout."""
    r, num_B = config.r, config.num_B
    shapes: dict[str, tuple[int, ...]] = {}
    for group in layout.groups:
        for leader in group.a_leaders(layout.stride_A):
            shapes[f"{leader}.lily_A.weight"] = (r, group.in_features)
        shapes[f"{group.key}.lily_B"] = (num_B, r, group.out_features)
        for path in group.paths:
            shapes[f"{path}.lily_router.weight"] = (num_B, r)
    return shapes


def lily_state_dict(model: nn.Module, adapter_name: str = "default") -> LilyStateDict:
    """The adapter's parameters under their file keys (no component prefix), each tensor once, with its config
    in `.metadata["lily_config"]`; `load_lily_weights` takes it (or a dict of them by component) like a file."""
    adapter = get_lily_adapter(model, adapter_name)
    tensors = {key: parameter.detach() for key, parameter in layout_tensors(adapter)}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, STATE_DICT_CONFIG_KEY: adapter.config.to_json()}
    return LilyStateDict(tensors, metadata)


def save_lily_weights(
    save_directory: str | os.PathLike[str],
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str = "default",
    weight_name: str | None = None,
) -> Path:
    """Write the adapter of each given component to `save_directory/weight_name` (default
    `pytorch_lily_weights.safetensors`), atomically."""
    weight_name = check_weight_name(weight_name)
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION}
    for component, model in zip(COMPONENTS, (unet, text_encoder, text_encoder_2), strict=True):
        if model is None:
            continue
        state = lily_state_dict(model, adapter_name)
        for key, tensor in state.items():
            tensors[f"{component}.{key}"] = tensor.contiguous().cpu()
        metadata[CONFIG_KEY_PREFIX + component] = state.metadata[STATE_DICT_CONFIG_KEY]
    if not tensors:
        raise ValueError("save_lily_weights needs at least one of unet, text_encoder, text_encoder_2.")
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / weight_name
    write_atomically(target, tensors, metadata)
    return target


def write_atomically(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file.

    The file gets the mode a plain `open()` gives: an existing file's, else 0o666 less the umask.
    (safetensors >= 0.8 writes every file 0o600, readable by its owner only.)
    """
    temporary = _new_temporary_file(target)
    try:
        mode = stat.S_IMODE((target if target.exists() else temporary).stat().st_mode)
        save_file(tensors, str(temporary), metadata=metadata)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _new_temporary_file(target: Path) -> Path:
    """Create a new, empty, uniquely named file beside `target`, as `open()` would (mode 0o666 less the umask)."""
    while True:
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # another writer's name (2**-64 odds): draw again
            continue
        return candidate


def check_weight_name(weight_name: str | None) -> str:
    """`weight_name`, or the default file name for None; a `ValueError` unless it is a plain `.safetensors` name."""
    if weight_name is None:
        return WEIGHTS_NAME
    plain = isinstance(weight_name, str) and not any(c in weight_name for c in "/\\") and weight_name[:1] != "."
    if not plain or not weight_name.endswith(".safetensors"):
        raise ValueError(
            f"weight_name must be a plain file name ending in .safetensors (use subfolder= for folders), "
            f"got {weight_name!r}."
        )
    return weight_name


def resolve_weights_path(
    path_or_dir: str | os.PathLike[str], weight_name: str = WEIGHTS_NAME, kind: str = "Lily"
) -> Path:
    """The weights file itself: `path_or_dir`, or `weight_name` inside it; `FileNotFoundError` naming the kind."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / weight_name
    if not path.is_file():
        raise FileNotFoundError(f"No {kind} weights file at {path}.")
    return path


def read_lily_file(path_or_dir: str | os.PathLike[str]) -> dict[str, LilyComponentWeights]:
    """Read and check a Lily file; returns its components (config and tensors) by name."""
    path = resolve_weights_path(path_or_dir)
    metadata, tensors = read_safetensors(path, LilyFileError, _check_format)
    return split_components(tensors, metadata, str(path))


def tensors_by_component(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    config_prefix: str,
    source: str,
    error: type[ValueError],
) -> Iterator[tuple[str, dict[str, torch.Tensor], str]]:
    """`(component, its tensors without the prefix, its config text)` for each of COMPONENTS that the metadata has
    a `{config_prefix}{component}` entry for; raises `error` for a component with tensors but no config."""
    for component in COMPONENTS:
        prefix = f"{component}."
        own = {key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
        text = metadata.get(config_prefix + component)
        if text is None:
            if own:
                raise error(f"{source} has {component} tensors but no '{config_prefix}{component}' metadata.")
            continue
        yield component, own, text


def split_components(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> dict[str, LilyComponentWeights]:
    """A file's tensors (keys with a component prefix) and header, as components by name, each config checked."""
    components = {
        component: LilyComponentWeights(_parse_config(config_json, source, component), own)
        for component, own, config_json in tensors_by_component(
            tensors, metadata, CONFIG_KEY_PREFIX, source, LilyFileError
        )
    }
    stray = sorted(k for k in tensors if not k.startswith(tuple(f"{c}." for c in components)))
    if stray:
        raise LilyFileError(f"{source} has keys outside its components {sorted(components)}: {_few(stray)}.")
    if not components:
        raise LilyFileError(f"{source} holds no Lily component.")
    return components


def state_dict_components(
    state_dicts: dict[str, LilyStateDict], source: str = "the state dict"
) -> dict[str, LilyComponentWeights]:
    """Components from `lily_state_dict` results keyed by component name, with the checks a file gets."""
    components: dict[str, LilyComponentWeights] = {}
    for component, state in state_dicts.items():
        if not isinstance(state, LilyStateDict):
            raise LilyFileError(
                f"{source} for {component} is a plain {type(state).__name__} without the Lily config; pass what "
                "lily_state_dict returns (its .metadata holds the config), or the saved file."
            )
        _check_format(f"{source} ({component})", state.metadata, list(state))
        config_json = state.metadata.get(STATE_DICT_CONFIG_KEY)
        if not isinstance(config_json, str):
            raise LilyFileError(f"{source} ({component}) has no '{STATE_DICT_CONFIG_KEY}' in its metadata.")
        components[component] = LilyComponentWeights(_parse_config(config_json, source, component), dict(state))
    return components


def _parse_config(config_json: str, source: str, component: str) -> LilyConfig:
    try:
        return LilyConfig.from_json(config_json)
    except (TypeError, ValueError) as error:
        raise LilyFileError(f"{source}: invalid Lily config for {component}: {error}") from error


def _check_format(path: object, metadata: dict[str, str], keys: list[str]) -> None:
    file_format = metadata.get("format")
    if file_format != FORMAT:
        if is_lora_file(keys):
            hint = "it looks like a LoRA file: load it with pipe.load_lora_weights()"
        elif any(".lily_" in key for key in keys):
            hint = "it looks like a peft Lily adapter: convert it with lily_diffusion.import_peft_lily()"
        else:
            hint = f"its metadata format is {file_format!r}"
        raise LilyFileError(f"{path} is not a lily_diffusion file ({hint}).")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise LilyFileError(
            f"{path} has lily_diffusion format_version {version!r}; this version reads {FORMAT_VERSION!r}. "
            "Upgrade lily_diffusion or re-save the adapter."
        )


def check_fits(model: nn.Module, weights: LilyComponentWeights, component: str) -> LilyLayout:
    """Rebuild the layout on `model`; check every key, shape and value against it (nothing is changed)."""
    check_finite(weights.tensors, f"the {component} adapter")
    try:
        layout = build_layout(model, weights.config)
    except (TypeError, ValueError) as error:
        raise LilyFileError(f"The {component} adapter does not fit {type(model).__name__}: {error}") from error
    expected = expected_shapes(layout, weights.config)
    mismatched = [
        f"{key}: file {tuple(weights.tensors[key].shape)}, model {shape}"
        for key, shape in expected.items()
        if key in weights.tensors and tuple(weights.tensors[key].shape) != shape
    ]
    if mismatched:
        raise LilyFileError(
            f"The {component} adapter was saved for a model of other widths; shape mismatches "
            f"({len(mismatched)}): {_few(mismatched)}."
        )
    missing = sorted(set(expected) - set(weights.tensors))
    unexpected = sorted(set(weights.tensors) - set(expected))
    if missing or unexpected:
        raise LilyFileError(
            f"The {component} adapter does not match {type(model).__name__} (saved for another model?): "
            f"missing keys ({len(missing)}): {_few(missing)}; unexpected keys ({len(unexpected)}): {_few(unexpected)}."
        )
    return layout


def check_finite(tensors: dict[str, torch.Tensor], owner: str) -> None:
    """Raise `LilyFileError` naming the first tensor that is not floating point or, in fp32, not finite.

    The adapter's parameters are fp32, so a float64 value beyond fp32's range counts as infinite.
    """
    for key, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            raise LilyFileError(
                f"Tensor {shorten(key)} of {owner} has dtype {tensor.dtype}; Lily weights are floating point."
            )
        if not torch.isfinite(tensor.to(torch.float32)).all():
            raise LilyFileError(
                f"Tensor {shorten(key)} of {owner} holds non-finite values (NaN or infinity); the weights are corrupt "
                "(a diverged training run?) and would make every image NaN."
            )


def copy_into_adapter(adapter: LilyAdapter, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors into the adapter's parameters (keeping the adapter's dtype and device)."""
    with torch.no_grad():
        for key, parameter in layout_tensors(adapter):
            parameter.copy_(tensors[key])


def attach_lily_weights(
    model: nn.Module,
    weights: LilyComponentWeights,
    adapter_name: str = "default",
    component: str = "model",
    replace: bool = True,
) -> LilyAdapter:
    """Put checked weights into `model` as the Lily adapter `adapter_name`, and return it.

    `replace=True`: check the weights against the model, remove any adapter of that name, add a new one with the
    weights' config and copy the weights in (pipeline loading, peft import). `replace=False`: copy them into the
    existing adapter, whose parameters (and an optimizer's references to them) stay; its config must be the
    weights' (resuming a training run). Nothing changes when a check fails (`LilyFileError`).
    """
    if not replace and get_lily_adapter(model, adapter_name).config != weights.config:
        raise LilyFileError(
            f"The {component} weights were saved with another Lily config than adapter {adapter_name!r} has."
        )
    check_fits(model, weights, component)
    if replace:
        if adapter_name in lily_adapters(model):
            remove_lily(model, adapter_name)
        adapter = add_lily(model, weights.config, adapter_name)
    else:
        adapter = get_lily_adapter(model, adapter_name)
    copy_into_adapter(adapter, weights.tensors)
    return adapter


def _few(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "") if items else "none"
