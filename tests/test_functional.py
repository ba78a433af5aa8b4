import pytest
import torch

from lily_diffusion import LilyConfig, add_lily
from lily_diffusion.functional import autocast_enabled, down_project, lily_delta, mix, project_up, route
from tests.helpers import unet_inputs
from toyworld.tiny_sdxl import build_unet


def plain_formula(x, A, router, B, scaling, routing):
    """The design's formula written out with loops: per sample, per expert."""
    h = x @ A.T
    p = torch.softmax(h @ router.T, dim=-1)
    if routing == "batch":
        w = p.reshape(-1, p.shape[-1]).mean(0)
        B_mix = sum(w[e] * B[e] for e in range(B.shape[0]))
        return scaling * (h @ B_mix)
    rows = []
    for i in range(x.shape[0]):
        w = p[i].reshape(-1, p.shape[-1]).mean(0)
        B_mix = sum(w[e] * B[e] for e in range(B.shape[0]))
        rows.append(scaling * (h[i] @ B_mix))
    return torch.stack(rows)


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 12, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, 7, generator=g)


@pytest.mark.parametrize("routing", ["sample", "batch"])
@pytest.mark.parametrize("shape", [(4, 12), (4, 6, 12), (2, 3, 3, 12)])
def test_delta_equals_the_plain_formula(weights, routing, shape):
    A, router, B = weights
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    got = lily_delta(x, A, router, B, 0.7, routing)
    assert got.shape == (*shape[:-1], 7)
    torch.testing.assert_close(got, plain_formula(x, A, router, B, 0.7, routing), atol=1e-5, rtol=1e-5)


def test_sample_routing_gives_one_weight_vector_per_sample(weights):
    A, router, _ = weights
    h = torch.randn(4, 6, 12) @ A.T
    w = route(h, router, "sample")
    assert w.shape == (4, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    assert route(h, router, "batch").shape == (3,)


def test_sample_routing_ignores_the_rest_of_the_batch(weights):
    A, router, B = weights
    x = torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(2))
    alone = lily_delta(x[:1], A, router, B, 1.0, "sample")
    together = lily_delta(x, A, router, B, 1.0, "sample")[:1]
    assert (alone - together).abs().max() <= 1e-5
    batch_alone = lily_delta(x[:1], A, router, B, 1.0, "batch")
    batch_together = lily_delta(x, A, router, B, 1.0, "batch")[:1]
    assert (batch_alone - batch_together).abs().max() > 1e-4  # peft's rule mixes samples


def test_mix_is_the_weighted_sum_of_experts(weights):
    _, _, B = weights
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    mixed = mix(w, B)
    torch.testing.assert_close(mixed[0], 0.2 * B[0] + 0.3 * B[1] + 0.5 * B[2])
    torch.testing.assert_close(mixed[1], B[0])


def test_project_up_applies_each_samples_mix_to_its_tokens():
    h = torch.randn(2, 3, 5)
    B_mix = torch.randn(2, 5, 4)
    out = project_up(h, B_mix)
    torch.testing.assert_close(out[1], h[1] @ B_mix[1])


def test_unknown_routing_is_an_error(weights):
    A, router, B = weights
    with pytest.raises(ValueError, match="Unknown routing"):
        lily_delta(torch.randn(2, 12), A, router, B, 1.0, "token")


def test_autocast_state_is_false_on_devices_autocast_does_not_know():
    assert autocast_enabled("meta") is False and autocast_enabled("cpu") is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu") is True and autocast_enabled("meta") is False


def test_lily_runs_forward_and_backward_on_the_meta_device():
    """Shapes without memory (FLOP counts): the down-projection and its cache ask about autocast on meta."""
    with torch.device("meta"):
        unet = build_unet(seed=0)
    unet.requires_grad_(False)
    adapter = add_lily(unet, LilyConfig(r=4, stride_A=2, num_B=2))
    inputs = unet_inputs()
    added = {key: value.to("meta") for key, value in inputs.pop("added_cond_kwargs").items()}
    out = unet(**{key: value.to("meta") for key, value in inputs.items()}, added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 8, 8) and out.device.type == "meta"
    out.sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in adapter.lily_A)
    x = torch.empty(2, 7, 64, device="meta", dtype=torch.float16)  # another dtype than A's: cast unless autocast
    assert down_project(x, adapter.lily_A[0]).dtype == torch.float32
