import pytest
import torch

from lily_diffusion.functional import lily_delta, mix, project_up, route


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
