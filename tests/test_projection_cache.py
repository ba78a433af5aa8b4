"""The down-projection cache: reuse only when exact, never across forwards, never under checkpointing."""

import gc

import pytest
import torch

import lily_diffusion.projection_cache as projection_cache
from lily_diffusion import LilyConfig, add_lily, remove_lily
from lily_diffusion.projection_cache import DownProjectionCache
from tests.helpers import unet_inputs


@pytest.fixture
def computations(monkeypatch):
    """Counts the down-projections actually computed."""
    counter = {"n": 0}
    compute = projection_cache.down_project

    def counted(x, A):
        counter["n"] += 1
        return compute(x, A)

    monkeypatch.setattr(projection_cache, "down_project", counted)
    return counter


def test_reuses_h_only_for_the_same_unmodified_input_and_weight(computations):
    cache, x, A = DownProjectionCache(), torch.randn(2, 3, 4), torch.randn(5, 4)
    cache.down_project(0, x, A)
    cache.down_project(0, x, A)
    assert computations["n"] == 2  # closed: no reuse outside a forward of the model
    cache.open()
    first = cache.down_project(0, x, A)
    assert cache.down_project(0, x, A) is first and computations["n"] == 3
    cache.down_project(1, x, A)  # another A
    cache.down_project(0, x.clone(), A)  # another input tensor
    x.add_(1.0)
    torch.testing.assert_close(cache.down_project(0, x, A), x @ A.T)
    A.mul_(2.0)
    torch.testing.assert_close(cache.down_project(0, x, A), x @ A.T)
    with torch.no_grad():
        cache.down_project(0, x, A)  # another grad mode
    assert computations["n"] == 8
    cache.close()
    assert cache._entries is None


def test_entries_die_with_their_input():
    cache, A = DownProjectionCache(), torch.randn(5, 4)
    cache.open()
    x = torch.randn(3, 4)
    cache.down_project(0, x, A)
    assert len(cache._entries) == 1
    del x
    gc.collect()
    assert cache._entries == {}


def test_no_reuse_while_saved_tensor_hooks_record(computations):
    cache, x, A = DownProjectionCache(), torch.randn(3, 4), torch.randn(5, 4, requires_grad=True)
    cache.open()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        cache.down_project(0, x, A)
        cache.down_project(0, x, A)
    assert computations["n"] == 2


def shared_config() -> LilyConfig:
    # One A for all layers of a group, so the cross-attention keys/values share A and input.
    return LilyConfig(r=4, stride_A=16, num_B=3, init_weights=False)


def train_grads(unet, adapter, inputs, steps=1):
    for p in adapter.parameters():
        p.grad = None
    for _ in range(steps):
        unet(**inputs).sample.square().mean().backward()
    return [p.grad.clone() for p in adapter.parameters()]


def test_cached_forward_and_gradients_equal_uncached(unet, computations, monkeypatch):
    adapter = add_lily(unet, shared_config())
    inputs = unet_inputs(2)
    with torch.no_grad():
        cached = unet(**inputs).sample
    layers = len(adapter.layout.slots)
    assert computations["n"] < layers
    grads = train_grads(unet, adapter, inputs)
    monkeypatch.setattr(projection_cache, "_cache_allowed", lambda: False)
    computations["n"] = 0
    with torch.no_grad():
        uncached = unet(**inputs).sample
    assert computations["n"] == layers
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    for mine, reference in zip(grads, train_grads(unet, adapter, inputs), strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_and_accumulation_give_the_same_gradients(unet):
    adapter = add_lily(unet, shared_config())
    inputs = unet_inputs(2)
    plain = train_grads(unet, adapter, inputs)
    accumulated = train_grads(unet, adapter, inputs, steps=2)  # same input tensors, no step in between
    unet.enable_gradient_checkpointing()
    unet.train()
    checkpointed = train_grads(unet, adapter, inputs)
    for one, two, ckpt in zip(plain, accumulated, checkpointed, strict=True):
        torch.testing.assert_close(two, 2 * one, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ckpt, one, atol=1e-5, rtol=1e-5)


def test_hooks_close_on_errors_and_go_away_with_the_adapter(unet):
    hooks_before = (len(unet._forward_pre_hooks), len(unet._forward_hooks))
    adapter = add_lily(unet, shared_config())
    with pytest.raises(TypeError):
        unet(**unet_inputs(2), no_such_argument=1)
    assert adapter.cache._entries is None and adapter.cache._depth == 0
    remove_lily(unet)
    assert (len(unet._forward_pre_hooks), len(unet._forward_hooks)) == hooks_before
