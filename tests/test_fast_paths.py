"""The fused paths of functional.py and LilyLinear stay within 1e-5 of the plain formula (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lily_diffusion import LilyConfig, add_lily
from lily_diffusion.functional import add_lily_, down_project, lily_delta
from tests.test_functional import plain_formula

SHAPES = [(4, 12), (4, 6, 12), (2, 3, 3, 12), (1, 5, 12)]


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def tensors(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    A, router, B = torch.randn(5, 12, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, 7, generator=g)
    W, bias = torch.randn(7, 12, generator=g), torch.randn(7, generator=g)
    return x, A, router, B, W, bias


def fused(x, A, router, B, W, bias, routing, scaling=0.7):
    return add_lily_(F.linear(x, W, bias), down_project(x, A), router, B, scaling, routing)


def plain(x, A, router, B, W, bias, routing, scaling=0.7):
    flat = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x
    return F.linear(x, W, bias) + plain_formula(flat, A, router, B, scaling, routing).reshape(*x.shape[:-1], 7)


@pytest.mark.parametrize("routing", ["sample", "batch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_add_equals_base_plus_plain_formula_without_grad(routing, shape):
    args = tensors(shape)
    with torch.no_grad():
        base = F.linear(args[0], args[4], args[5])
        got = add_lily_(base, down_project(args[0], args[1]), *args[2:4], 0.7, routing)
    assert got is base  # written in place: no activation-sized temporary
    torch.testing.assert_close(got, plain(*args, routing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["sample", "batch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_gradients_equal_the_plain_formulas(routing, shape):
    leaves = [t.clone().requires_grad_() for t in tensors(shape)[:4]]
    W, bias = tensors(shape)[4:]
    got = fused(*leaves, W, bias, routing)
    expected_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    expected = plain(*expected_leaves, W, bias, routing)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    got.backward(upstream)
    expected.backward(upstream)
    for mine, reference in zip(leaves, expected_leaves, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=1e-5)


def test_fused_add_never_modifies_a_tensor_autograd_needs():
    x, A, router, B, W, bias = tensors((2, 4, 12))
    A.requires_grad_()
    base = F.linear(x, W, bias)
    kept = base.clone()
    got = add_lily_(base, down_project(x, A), router, B, 1.0, "sample")
    assert got is not base and torch.equal(base, kept)


def test_one_dimensional_input_is_one_token():
    x, A, router, B, _, _ = tensors((12,))
    torch.testing.assert_close(
        lily_delta(x, A, router, B, 0.5), plain_formula(x[None], A, router, B, 0.5, "sample")[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("grad", [False, True])
def test_half_precision_base_gets_the_fp32_delta_rounded_once(grad):
    model = OneLayer().half()
    adapter = add_lily(model, LilyConfig(r=5, stride_A=1, num_B=3, init_weights=False, target_modules=["proj"]))
    x = torch.randn(2, 4, 12).half()
    with torch.set_grad_enabled(grad):
        got = model(x)
    assert got.dtype == torch.float16
    base = F.linear(x, model.proj.weight, model.proj.bias)
    delta = lily_delta(x, adapter.lily_A[0], adapter.lily_router[0], adapter.lily_B[0], 1.0)
    assert delta.dtype == torch.float32
    assert torch.equal(got, (base.float() + delta).half())  # one rounding, from fp32
    if grad:
        got.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.parameters())


def test_autocast_leaves_the_input_to_autocast_and_matches_the_plain_formula():
    x, A, router, B, W, bias = tensors((2, 6, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = down_project(x.bfloat16(), A)
        got = fused(x.bfloat16(), A, router, B, W.bfloat16(), bias.bfloat16(), "sample")
        expected = F.linear(x.bfloat16(), W.bfloat16(), bias.bfloat16()) + lily_delta(
            x.bfloat16(), A, router, B, 0.7
        ).to(torch.bfloat16)
    assert h.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(got.float(), plain(x, A, router, B, W, bias, "sample"), atol=0.2, rtol=0.05)
