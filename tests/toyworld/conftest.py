"""The toy-world tests run their small models on one thread: on a shared 2-core machine, two OpenMP threads that
spin while they wait make 32x32 inference several times slower, and one thread costs little at this size."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
