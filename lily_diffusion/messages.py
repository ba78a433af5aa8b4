"""Turning a library's exception into text for a one-line message."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages can run to pages), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (whitespace collapsed), cut to `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error is an allocation that failed (torch's CPU and CUDA allocators, or Python's)."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or "alloc" in text or "out of memory" in text
