"""The adapter kinds the trainer can train, by `--adapter` value: the one place that names them."""

from __future__ import annotations

from .base import ADAPTER_NAME, AdapterBackend, AdapterError, AdapterOptions
from .lily import LilyBackend
from .lora import DoraBackend, LoraBackend
from .lycoris import LohaBackend, LokrBackend

BACKENDS: dict[str, AdapterBackend] = {
    backend.kind: backend for backend in (LilyBackend(), LoraBackend(), DoraBackend(), LokrBackend(), LohaBackend())
}
DEFAULT_ADAPTER = LilyBackend.kind
ALL_WEIGHT_NAMES: tuple[str, ...] = tuple(
    dict.fromkeys(name for backend in BACKENDS.values() for name in backend.file_names)
)


def get_backend(kind: str) -> AdapterBackend:
    """The backend for an `--adapter` value; a ValueError naming the known kinds for any other."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown adapter kind {kind!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[kind]


__all__ = [
    "ADAPTER_NAME",
    "ALL_WEIGHT_NAMES",
    "BACKENDS",
    "DEFAULT_ADAPTER",
    "AdapterBackend",
    "AdapterError",
    "AdapterOptions",
    "get_backend",
]
