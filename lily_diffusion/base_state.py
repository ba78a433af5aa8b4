"""A model's own state dict stays the base model's: an adapter is saved with `save_lily_weights`, not with it.

`add_lily` registers the adapters in `model.lily_adapters`, a `ModuleDict` made here whose tensors leave
`model.state_dict()` and are not asked for by `model.load_state_dict()`. So diffusers' and transformers'
`save_pretrained` of an adapted model or pipeline write the clean base weights (which reload to the base
model), and a base checkpoint loads strictly into an adapted model without touching its adapters.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .sharing import ADAPTERS_ATTRIBUTE


def adapters_container() -> nn.ModuleDict:
    """An empty `ModuleDict` for `model.lily_adapters` whose contents stay out of the model's state dict."""
    container = nn.ModuleDict()
    container.register_state_dict_post_hook(_drop_adapter_keys)
    container.register_load_state_dict_post_hook(_forget_missing_adapter_keys)
    return container


def is_adapter_key(key: str) -> bool:
    """True for a state-dict key inside a `lily_adapters` container."""
    return f".{ADAPTERS_ATTRIBUTE}." in f".{key}"


def _drop_adapter_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: object) -> None:
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


def _forget_missing_adapter_keys(module: nn.Module, incompatible_keys: _IncompatibleKeys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not is_adapter_key(k)]
