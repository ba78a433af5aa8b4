"""Pipeline-level verbs: load / unload / scale / switch Lily adapters on a diffusers pipeline or a bare model."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from .adapter import LilyAdapter, activate_lily, activate_lily_stack, get_lily_adapter, lily_adapters, remove_lily
from .config import check_multiplier
from .features import follow_lora_scale
from .hub import LilySource, lily_source_components
from .layer import LilyMergeError
from .serialization import COMPONENTS, LilyComponentWeights, attach_lily_weights, check_fits

logger = logging.getLogger(__name__)


def components_of(pipe_or_model: object) -> dict[str, nn.Module]:
    """The adaptable components: a pipeline's unet / text encoders that are present, or the model itself.

    A `torch.compile`d module is replaced by the module it wraps, so adapters go by the original names."""
    if isinstance(pipe_or_model, nn.Module):
        return {"model": unwrap_module(pipe_or_model)}
    found = {name: getattr(pipe_or_model, name, None) for name in COMPONENTS}
    found = {name: unwrap_module(module) for name, module in found.items() if isinstance(module, nn.Module)}
    if not found:
        raise TypeError(
            f"Expected a diffusers pipeline with unet/text_encoder/text_encoder_2 or an nn.Module, "
            f"got {type(pipe_or_model).__name__}."
        )
    return found


def load_lily_weights(
    pipe_or_model: object,
    pretrained_model_name_or_path_or_dict: LilySource,
    adapter_name: str = "default",
    scale: float = 1.0,
    weight_name: str | None = None,
    subfolder: str | None = None,
    component: str | None = None,
    **hub_kwargs: object,
) -> None:
    """Load a Lily adapter into a pipeline or model (a `torch.compile`d one too) from a weights file, a folder
    holding `weight_name` (default `pytorch_lily_weights.safetensors`, below `subfolder`), a hub repo id
    (`hub_kwargs`: `cache_dir`, `revision`, `token`, `local_files_only`; `HF_HUB_OFFLINE` applies), or a state
    dict from `lily_state_dict` (or a dict of them keyed by component).

    For a pipeline, every component in the file (or only the one named by `component`) is loaded
    into the pipeline's component of that name. For a bare model, the file's only component is
    used, or the one named by `component`.
    Everything (`scale`, the file's config, keys, shapes and values) is checked before anything
    changes: a failed load leaves the model as it was. An adapter already loaded under
    `adapter_name` is replaced.
    """
    scale = check_multiplier("scale", scale)
    source = (pretrained_model_name_or_path_or_dict, weight_name, subfolder)
    targets = _checked_targets(pipe_or_model, source, component, hub_kwargs)
    for name, (model, weights) in targets.items():
        attach_lily_weights(model, weights, adapter_name, name).scale = scale
    follow_pipeline_scale(pipe_or_model)
    logger.info("Loaded Lily adapter %r into %s.", adapter_name, ", ".join(targets))


def check_lily_weights(
    pipe_or_model: object,
    pretrained_model_name_or_path_or_dict: LilySource,
    component: str | None = None,
    weight_name: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs: object,
) -> list[str]:
    """Every check `load_lily_weights` makes, without loading anything; returns the components it would load."""
    source = (pretrained_model_name_or_path_or_dict, weight_name, subfolder)
    return list(_checked_targets(pipe_or_model, source, component, hub_kwargs))


def _checked_targets(
    pipe_or_model: object,
    source: tuple[LilySource, str | None, str | None],
    component: str | None,
    hub_kwargs: dict[str, object],
) -> dict[str, tuple[nn.Module, LilyComponentWeights]]:
    file_components, label = lily_source_components(*source, component=component, **hub_kwargs)
    targets = _pair_components(pipe_or_model, file_components, component, label)
    for name, (model, weights) in targets.items():
        check_fits(model, weights, name)
    return targets


def _pair_components(
    pipe_or_model: object,
    file_components: dict[str, LilyComponentWeights],
    component: str | None,
    source: object,
) -> dict[str, tuple[nn.Module, LilyComponentWeights]]:
    if isinstance(pipe_or_model, nn.Module):
        pipe_or_model = unwrap_module(pipe_or_model)
        if component is None:
            if len(file_components) != 1:
                raise ValueError(
                    f"{source} holds adapters for {sorted(file_components)}; pass component=... to pick one "
                    "for a bare model, or load into the pipeline."
                )
            component = next(iter(file_components))
        if component not in file_components:
            raise ValueError(f"{source} has no {component!r} adapter; it has {sorted(file_components)}.")
        return {component: (pipe_or_model, file_components[component])}
    available = components_of(pipe_or_model)
    if component is not None:
        if component not in file_components:
            raise ValueError(f"{source} has no {component!r} adapter; it has {sorted(file_components)}.")
        file_components = {component: file_components[component]}
    lacking = sorted(set(file_components) - set(available))
    if lacking:
        raise ValueError(f"{source} has adapters for {lacking}, which this pipeline does not have.")
    return {name: (available[name], weights) for name, weights in file_components.items()}


def unload_lily_weights(pipe_or_model: object, adapter_name: str | None = None) -> None:
    """Remove the named adapter (or all Lily adapters) from every component; originals come back."""
    for model in components_of(pipe_or_model).values():
        if adapter_name is None or adapter_name in lily_adapters(model):
            remove_lily(model, adapter_name)


def set_lily_scale(pipe_or_model: object, scale: float, adapter_name: str | None = None) -> None:
    """Multiply the adapter's output by `scale` (on top of its config's `scaling`); 0 turns it off.

    `scale` must be a finite number with |scale| <= 1000 (`ValueError` otherwise, nothing changed).
    """
    scale = check_multiplier("scale", scale)
    for adapter in _selected_adapters(pipe_or_model, adapter_name):
        adapter.scale = scale


def set_lily_adapter(pipe_or_model: object, adapter_name: str | list[str] | tuple[str, ...] | None) -> None:
    """Make `adapter_name` the active Lily adapter of every component that has it (None: no adapter).

    A list of names activates them all with weight 1 (`set_lily_adapters`).
    """
    if isinstance(adapter_name, list | tuple):
        set_lily_adapters(pipe_or_model, adapter_name)
        return
    models = [
        m for m in components_of(pipe_or_model).values() if adapter_name is None or adapter_name in lily_adapters(m)
    ]
    if not models:
        raise KeyError(f"No component has a Lily adapter named {adapter_name!r}.")
    for model in components_of(pipe_or_model).values():
        if lily_adapters(model):
            activate_lily(model, adapter_name if adapter_name in lily_adapters(model) else None)


def set_lily_adapters(
    model_or_pipe: object,
    adapter_names: str | Sequence[str],
    adapter_weights: float | Sequence[float] | None = None,
) -> None:
    """Activate several Lily adapters at once: each adapted layer outputs `W x + sum_i w_i * delta_i(x)`.

    Like diffusers' `set_adapters`: `adapter_weights` is one number for all, one per name, or None
    (1.0 each); every adapter keeps its own per-sample routing and its `set_lily_scale`. Adapters
    not named are switched off (still loaded). Everything is checked before anything changes.
    """
    weights = stack_weights(adapter_names, adapter_weights)
    components = components_of(model_or_pipe)
    loaded = {name for model in components.values() for name in lily_adapters(model)}
    unknown = [name for name in weights if name not in loaded]
    if unknown:
        raise ValueError(f"No Lily adapter named {unknown} is loaded here; loaded: {sorted(loaded) or 'none'}.")
    for model in components.values():
        if lily_adapters(model):
            activate_lily_stack(model, {name: w for name, w in weights.items() if name in lily_adapters(model)})
    follow_pipeline_scale(model_or_pipe)


def stack_weights(
    adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None
) -> dict[str, float]:
    """`{name: weight}` from `set_lily_adapters`' arguments, or one `ValueError`/`TypeError` sentence."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"adapter_names must be a name or a list of names, got {adapter_names!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_names lists an adapter more than once: {list(names)}.")
    if adapter_weights is None or isinstance(adapter_weights, int | float):
        weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
    elif isinstance(adapter_weights, list | tuple):
        weights = list(adapter_weights)
    else:
        kind = type(adapter_weights).__name__
        raise TypeError(f"adapter_weights must be a number or a list of numbers, got {kind}.")
    if len(weights) != len(names):
        raise ValueError(
            f"adapter_weights has {len(weights)} entries for {len(names)} adapter_names; give one weight per name."
        )
    return {name: check_multiplier(f"adapter_weights[{name!r}]", w) for name, w in zip(names, weights, strict=True)}


def follow_pipeline_scale(pipe_or_model: object) -> None:
    """On a pipeline, make `cross_attention_kwargs={"scale": s}` reach the text encoders' Lily adapters too."""
    if not isinstance(pipe_or_model, nn.Module):
        components = components_of(pipe_or_model)
        follow_lora_scale(pipe_or_model, [components.get("text_encoder"), components.get("text_encoder_2")])


def disable_lily(pipe_or_model: object, adapter_name: str | None = None) -> None:
    """Switch adapters off without removing them (outputs equal the base model's)."""
    for adapter in _selected_adapters(pipe_or_model, adapter_name):
        adapter.enabled = False


def enable_lily(pipe_or_model: object, adapter_name: str | None = None) -> None:
    """Switch adapters back on after `disable_lily`."""
    for adapter in _selected_adapters(pipe_or_model, adapter_name):
        adapter.enabled = True


def fuse_lily(pipe_or_model: object) -> None:
    """Always raises: a Lily update depends on the input, so it cannot be fused into the weights."""
    raise LilyMergeError()


def _selected_adapters(pipe_or_model: object, adapter_name: str | None) -> list[LilyAdapter]:
    models = components_of(pipe_or_model).values()
    if adapter_name is None:
        selected = [adapter for model in models for adapter in lily_adapters(model).values()]
    else:
        selected = [get_lily_adapter(m, adapter_name) for m in models if adapter_name in lily_adapters(m)]
    if not selected:
        what = f"named {adapter_name!r}" if adapter_name else "at all"
        raise KeyError(f"No Lily adapter {what} is loaded here.")
    return selected
