"""Compute `h = A x` once when several layers share an A and get the very same input tensor.

In SDXL every cross-attention `to_k` (and `to_v`) receives the same `encoder_hidden_states`, and
`stride_A` consecutive ones share one A: they all compute the same `h`, with a 2048-wide input.
Reusing it is exact (autograd sums the layers' gradients into the one `h`) and removes most of
the adapter's cost on the text tokens (benchmarks/results/profile.md).

Scope and safety: the cache is open only while the model the adapter was added to runs its
forward (hooks), and an entry is reused only for the same input tensor object, unmodified
(`_version`), with the same A version, grad mode and autocast state. An entry is dropped as soon
as its input tensor is freed, so hidden states that pass through once are not kept alive. Nothing is cached while
saved-tensor hooks are active (non-reentrant gradient checkpointing, activation offloading), so
a checkpointed region recomputes exactly what it computed the first time, nor while compiling.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import torch

from .functional import autocast_enabled, down_project

_top_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _cache_allowed() -> bool:
    if torch.compiler.is_compiling():
        return False
    if _top_saved_tensor_hooks is None:  # cannot tell whether a checkpoint is recording: only without grad
        return not torch.is_grad_enabled()
    return _top_saved_tensor_hooks(False) is None


@dataclass
class _Entry:
    source: weakref.ref[torch.Tensor]
    source_version: int
    weight_version: int
    state: tuple[bool, bool]
    h: torch.Tensor


class DownProjectionCache:
    """Per adapter; `open`/`close` are the model's forward pre-hook and forward hook."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], _Entry] | None = None
        self._depth = 0

    def open(self, *_: object) -> None:
        self._depth += 1
        if self._depth == 1:
            self._entries = {}

    def close(self, *_: object) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._entries is not None:
            self._entries.clear()  # also breaks the entry -> weakref -> callback cycles
            self._entries = None

    def down_project(self, a_index: int, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """`down_project(x, A)`, reused for the same A and the same input within one forward of the model."""
        entries = self._entries
        if entries is None or not _cache_allowed():
            return down_project(x, A)
        key = (a_index, id(x))
        state = (torch.is_grad_enabled(), autocast_enabled(x.device.type))
        entry = entries.get(key)
        if (
            entry is not None
            and entry.source() is x
            and entry.source_version == x._version
            and entry.weight_version == A._version
            and entry.state == state
        ):
            return entry.h
        h = down_project(x, A)
        source = weakref.ref(x, partial(self._forget, key))
        entries[key] = _Entry(source, x._version, A._version, state, h)
        return h

    def _forget(self, key: tuple[int, int], source: weakref.ref[torch.Tensor]) -> None:
        """The input of an entry was freed: drop the entry (and its h) at once, before its id is reused."""
        entries = self._entries
        if entries is not None and key in entries and entries[key].source is source:
            del entries[key]

    def __deepcopy__(self, memo: dict[int, object]) -> DownProjectionCache:
        return DownProjectionCache()  # entries belong to a running forward, never to a copy
