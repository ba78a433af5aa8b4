"""`save_pretrained` of an adapted model writes the base model: the adapter is saved with `save_lily_weights`.

`add_lily` registers the adapters in `model.lily_adapters`, a `ModuleDict` made here, and gives the model a
`save_pretrained` that runs its class's own (diffusers' `ModelMixin` or transformers' `PreTrainedModel`) while the
container's tensors are left out of `model.state_dict()`. So `pipe.save_pretrained(...)` writes the clean base
weights, which reload to the base model. Everywhere else `state_dict()` keeps the adapter's tensors (accelerate's
offloading reads the weights from it), and a base checkpoint still loads strictly into an adapted model: the
adapter's keys are not reported missing.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .sharing import ADAPTERS_ATTRIBUTE

SAVE_METHOD = "save_pretrained"


def adapters_container(model: nn.Module) -> nn.ModuleDict:
    """An empty `ModuleDict` for `model.lily_adapters`; `model.save_pretrained` (if it has one) then skips it."""
    container = nn.ModuleDict()
    container.saving_base = False
    container.register_state_dict_post_hook(_drop_adapter_keys_while_saving)
    container.register_load_state_dict_post_hook(_forget_missing_adapter_keys)
    if callable(getattr(type(model), SAVE_METHOD, None)):
        setattr(model, SAVE_METHOD, types.MethodType(_save_base_pretrained, model))
    return container


def forget_adapters_container(model: nn.Module) -> None:
    """Undo `adapters_container`'s `save_pretrained` once the model has no adapter left."""
    vars(model).pop(SAVE_METHOD, None)


def is_adapter_key(key: str) -> bool:
    """True for a state-dict key inside a `lily_adapters` container."""
    return f".{ADAPTERS_ATTRIBUTE}." in f".{key}"


def _save_base_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's `save_pretrained`, with the Lily adapters left out of the weights it writes."""
    container = model._modules.get(ADAPTERS_ATTRIBUTE)
    if container is not None:
        container.saving_base = True
    try:
        return getattr(type(model), SAVE_METHOD)(model, *args, **kwargs)
    finally:
        if container is not None:
            container.saving_base = False


def _drop_adapter_keys_while_saving(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: object
) -> None:
    if getattr(module, "saving_base", False):
        for key in [key for key in state_dict if key.startswith(prefix)]:
            del state_dict[key]


def _forget_missing_adapter_keys(module: nn.Module, incompatible_keys: _IncompatibleKeys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not is_adapter_key(k)]
