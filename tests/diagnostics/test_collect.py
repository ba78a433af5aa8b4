"""Expert mixes recorded on a real (tiny) pipeline, and the per-layer analysis, on adapters with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lily_diffusion import LilyConfig, add_lily, save_lily_weights
from lily_diffusion.diagnostics import analyse_layers, collect_mixes, expert_use
from lily_diffusion.diagnostics.weights import lily_weight_stats

PROMPTS = ["a photo of sks star", "a red circle on the background", "a blue dog"]
CONFIG = LilyConfig(r=2, stride_A=2, num_B=3, init_weights=False)


def test_uniform_router_gives_log_num_B_and_no_spread(pipe):
    adapter = add_lily(pipe.unet, CONFIG)
    with torch.no_grad():
        for router in adapter.lily_router:
            router.zero_()
    activations = collect_mixes(pipe, PROMPTS, num_inference_steps=2)
    assert len(activations.timesteps) == 2
    assert set(activations.mixes) == {f"unet.{path}" for path in adapter.layers}
    for mixes in activations.mixes.values():
        assert mixes.shape == (2, len(PROMPTS), 3)
        assert torch.allclose(mixes, torch.full_like(mixes, 1 / 3))
    for layer in analyse_layers(pipe, activations):
        assert layer.router_entropy == pytest.approx(math.log(3))
        assert layer.tv_spread == pytest.approx(0.0, abs=1e-7)
        assert layer.tv_prompts == pytest.approx(0.0, abs=1e-7) and layer.tv_timesteps == pytest.approx(0.0, abs=1e-7)
        # one mix for every input: the stack reaches nothing beyond a single update
        assert layer.stacked_effective_rank == pytest.approx(layer.per_input_effective_rank, rel=1e-5)
        assert layer.per_input_effective_rank <= CONFIG.r + 1e-9


def test_identical_experts_are_a_static_adapter(pipe):
    """Routers that vary per input but experts that are all the same: the update never changes (rank <= r)."""
    adapter = add_lily(pipe.unet, CONFIG)
    with torch.no_grad():
        for pool in adapter.lily_B:
            pool.copy_(pool[0].expand_as(pool))
    layers = analyse_layers(pipe, collect_mixes(pipe, PROMPTS, num_inference_steps=2))
    assert max(layer.tv_spread for layer in layers) > 0.0  # the routers do react to the input
    # cross-attention keys and values see only the prompt's text states: same mix at every timestep
    text_only = [layer for layer in layers if ".attn2.to_k" in layer.key or ".attn2.to_v" in layer.key]
    assert text_only and all(layer.tv_timesteps == pytest.approx(0.0, abs=1e-6) for layer in text_only)
    assert all(layer.tv_prompts > 0.0 for layer in text_only)
    for layer in layers:
        assert layer.stacked_effective_rank == pytest.approx(layer.per_input_effective_rank, rel=1e-5)
        assert layer.stacked_effective_rank <= CONFIG.r + 1e-9


def test_input_dependent_mixes_reach_above_rank_r(pipe, tmp_path):
    """Routers scaled up so that they pick sharply by input: the stacked update goes past rank r somewhere."""
    adapter = add_lily(pipe.unet, CONFIG)
    with torch.no_grad():
        for router in adapter.lily_router:
            router.mul_(50.0)
    activations = collect_mixes(pipe, PROMPTS, num_inference_steps=3)
    layers = analyse_layers(pipe, activations)
    assert max(layer.stacked_effective_rank for layer in layers) > CONFIG.r
    assert all(layer.per_input_effective_rank <= CONFIG.r + 1e-9 for layer in layers)
    assert all(0.0 <= layer.router_entropy <= layer.max_entropy + 1e-9 for layer in layers)
    save_lily_weights(tmp_path, unet=pipe.unet)
    uses = expert_use(lily_weight_stats(tmp_path).pools, layers)
    assert all(use.mean_weights is not None and sum(use.mean_weights) == pytest.approx(1.0) for use in uses)


def test_recorded_mixes_are_the_ones_the_layer_applies(pipe):
    """For one layer and every call: output - base output == (A x) @ (scaling · Σ_e p_e B_e) with the recorded p."""
    adapter = add_lily(pipe.unet, LilyConfig(r=2, stride_A=2, num_B=3, scaling=0.5, init_weights=False))
    path, layer = next(iter(adapter.layers.items()))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    try:
        activations = collect_mixes(pipe, PROMPTS, num_inference_steps=2)
    finally:
        handle.remove()
    slot = adapter.layout.slots[path]
    A, B = adapter.lily_A[slot.a_index].detach(), adapter.lily_B[slot.group].detach()
    recorded = activations.mixes[f"unet.{path}"]
    assert len(seen) == recorded.shape[0] == 2
    for (x, output), p in zip(seen, recorded, strict=True):
        delta = output - torch.nn.functional.linear(x, layer.weight, layer.bias)
        expected = torch.einsum("btr,bro->bto", x.flatten(1, -2) @ A.t(), 0.5 * torch.einsum("be,ero->bro", p, B))
        assert torch.allclose(delta.flatten(1, -2), expected, atol=1e-5)
