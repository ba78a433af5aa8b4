"""`LilyAdapter` and the verbs that put it into a model and take it out (`add_lily`, `remove_lily`)."""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import unwrap_module
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base_state import adapters_container, forget_adapters_container
from .config import LilyConfig
from .features import attention_parents, call_scale_of, offload, offload_hooks, onload, wrap_fused_projections
from .functional import add_lily_
from .layer import LilyLinear, LilyMergeError
from .projection_cache import DownProjectionCache
from .sharing import ADAPTERS_ATTRIBUTE, LayerSlot, LilyLayout, build_layout
from .wrappers import linear_at, replace_linear


class LilyAdapter(nn.Module):
    """Owns one adapter's unique parameters, each exactly once.

    `lily_A[i]` is `[r, in]`, `lily_B[g]` is group g's expert pool `[num_B, r, out]` and
    `lily_router[j]` is layer j's router `[num_B, r]`; `layout` says which layer uses which.
    `adapter.parameters()` is what an optimizer needs and `num_parameters` the true count.
    """

    def __init__(self, config: LilyConfig, layout: LilyLayout, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        self.scale = 1.0
        self.call_scale = 1.0  # `cross_attention_kwargs={"scale": s}` of the forward in progress (see features)
        self._outer_call_scale = 1.0
        self._offloaded: list[tuple[nn.Module, object]] = []
        self.attention_modules: list[nn.Module] = []
        self.enabled = True
        self.layers: dict[str, LilyLinear] = {}  # module path -> wrapped layer (not owned)
        self.cache = DownProjectionCache()  # h = A x reused by the layers of one A with the same input
        self.hooks: list[RemovableHandle] = []  # open/close the cache around the model's forward
        r, num_B = config.r, config.num_B
        kwargs = {"device": device, "dtype": torch.float32}
        self.lily_A = nn.ParameterList(
            nn.Parameter(torch.empty(r, group.in_features, **kwargs))
            for group in layout.groups
            for _ in range(group.num_A(layout.stride_A))
        )
        self.lily_B = nn.ParameterList(
            nn.Parameter(torch.empty(num_B, r, group.out_features, **kwargs)) for group in layout.groups
        )
        self.lily_router = nn.ParameterList(
            nn.Parameter(torch.empty(num_B, r, **kwargs)) for _ in range(layout.num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A and routers Kaiming-uniform (a=sqrt(5)); B zero, or Kaiming when `init_weights=False`."""
        for weight in [*self.lily_A, *self.lily_router]:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        for pool in self.lily_B:
            if self.config.init_weights:
                nn.init.zeros_(pool)
            else:  # the same fan-in as a Linear(out, num_B * r), like peft
                with torch.no_grad():
                    nn.init.kaiming_uniform_(pool.view(-1, pool.shape[-1]), a=math.sqrt(5))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def add_to(self, result: torch.Tensor, x: torch.Tensor, slot: LayerSlot, weight: float = 1.0) -> torch.Tensor:
        """`result + weight * delta(x)` for one layer, written into `result` (the base output) in place."""
        multiplier = self.config.scaling * self.scale * self.call_scale * weight
        if multiplier == 0.0:
            return result
        A = self.lily_A[slot.a_index]
        return add_lily_(
            result,
            self.cache.down_project(slot.a_index, x, A),
            self.lily_router[slot.router_index],
            self.lily_B[slot.group],
            multiplier,
            self.config.routing,
        )

    def attach_hooks(self, model: nn.Module) -> None:
        """Hooks around each forward of `model`: the call's LoRA scale, fused q/k/v, offload, the cache."""
        self.attention_modules = attention_parents(model, self.layers)
        self.hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    def _before_forward(self, model: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        wrap_fused_projections(self.attention_modules)
        self._offloaded = offload_hooks(self)
        onload(self._offloaded)
        self._outer_call_scale = self.call_scale
        scale = call_scale_of(kwargs)
        if scale is not None:
            self.call_scale = scale
        self.cache.open()

    def _after_forward(self, model: nn.Module, args: tuple[object, ...], output: object) -> None:
        self.cache.close()
        self.call_scale = self._outer_call_scale
        offload(self._offloaded)

    def detach_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def merge(self, *args: object) -> None:
        raise LilyMergeError()

    def __repr__(self) -> str:  # the parameter lists are long; summarise them
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return (
            f"r={self.config.r}, stride_A={self.config.stride_A}, num_B={self.config.num_B}, "
            f"layers={self.layout.num_layers}, groups={len(self.layout.groups)}, A={self.layout.num_A}, "
            f"parameters={self.num_parameters:,}"
        )


def lily_adapters(model: nn.Module) -> dict[str, LilyAdapter]:
    """The Lily adapters in `model`, by name (empty when there are none)."""
    container = getattr(model, ADAPTERS_ATTRIBUTE, None)
    return dict(container.items()) if isinstance(container, nn.ModuleDict) else {}


def get_lily_adapter(model: nn.Module, adapter_name: str = "default") -> LilyAdapter:
    adapters = lily_adapters(model)
    if adapter_name not in adapters:
        raise KeyError(
            f"{type(model).__name__} has no Lily adapter named {adapter_name!r}; it has {sorted(adapters) or 'none'}."
        )
    return adapters[adapter_name]


def add_lily(model: nn.Module, config: LilyConfig, adapter_name: str = "default") -> LilyAdapter:
    """Wrap every targeted Linear of `model` and attach a new adapter, which becomes the active one.

    Like peft, the model's own parameters are frozen; the adapter's are trainable and in fp32.
    The adapter is registered as `model.lily_adapters[adapter_name]` so it moves with `model.to()`.
    """
    model = unwrap_module(model)  # a torch.compile'd model: adapt the module it wraps, by its own names
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}.")
    if adapter_name in lily_adapters(model):
        raise ValueError(
            f"{type(model).__name__} already has a Lily adapter named {adapter_name!r}; "
            "remove_lily(model, name) first or choose another name."
        )
    config.validate()
    layout = build_layout(model, config)
    first_layer = linear_at(model, layout.groups[0].paths[0])
    adapter = LilyAdapter(config, layout, device=first_layer.weight.device)
    for path, slot in layout.slots.items():
        layer = linear_at(model, path)
        if not isinstance(layer, LilyLinear):
            layer = LilyLinear(layer)
            replace_linear(model, path, layer)
        layer.adapters[adapter_name] = adapter
        layer.slots[adapter_name] = slot
        layer.active_adapters = {adapter_name: 1.0}
        adapter.layers[path] = layer
    if not isinstance(getattr(model, ADAPTERS_ATTRIBUTE, None), nn.ModuleDict):
        setattr(model, ADAPTERS_ATTRIBUTE, adapters_container(model))
    getattr(model, ADAPTERS_ATTRIBUTE)[adapter_name] = adapter
    adapter.attach_hooks(model)
    _freeze_all_but_lily(model)
    return adapter


def remove_lily(model: nn.Module, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all); layers left with none get their original `nn.Linear` back."""
    model = unwrap_module(model)
    adapters = lily_adapters(model)
    names = list(adapters) if adapter_name is None else [adapter_name]
    for name in names:
        adapter = get_lily_adapter(model, name)
        for path, layer in adapter.layers.items():
            del layer.adapters[name]
            del layer.slots[name]
            layer.active_adapters.pop(name, None)
            if not layer.adapters and linear_at(model, path) is layer:
                replace_linear(model, path, layer.restored_layer())
        adapter.layers = {}
        adapter.detach_hooks()
        del getattr(model, ADAPTERS_ATTRIBUTE)[name]
    if not lily_adapters(model) and hasattr(model, ADAPTERS_ATTRIBUTE):
        delattr(model, ADAPTERS_ATTRIBUTE)
        forget_adapters_container(model)


def activate_lily(model: nn.Module, adapter_name: str | None) -> None:
    """Make `adapter_name` the only active adapter of every Lily layer, with weight 1 (None: none active)."""
    activate_lily_stack(model, {} if adapter_name is None else {adapter_name: 1.0})


def activate_lily_stack(model: nn.Module, weights: dict[str, float]) -> None:
    """Make exactly the adapters in `weights` active on every Lily layer, each with its weight.

    A layer adds `sum_i weights[i] * delta_i(x)` over the named adapters it carries.
    """
    for name in weights:
        get_lily_adapter(model, name)
    for adapter in lily_adapters(model).values():
        for layer in adapter.layers.values():
            layer.active_adapters = {name: weight for name, weight in weights.items() if name in layer.adapters}


def _freeze_all_but_lily(model: nn.Module) -> None:
    lily = {id(p) for adapter in lily_adapters(model).values() for p in adapter.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in lily:
            parameter.requires_grad_(False)
