"""The math of lily-inspect on inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lily_diffusion.diagnostics.stats import (
    effective_rank,
    entropy,
    lily_stacked_singular_values,
    lily_update_singular_values,
    lora_singular_values,
    max_pairwise_tv,
    pool_singular_values,
    tv_spread,
)
from lily_diffusion.functional import route

R, IN, OUT, NUM_B = 3, 10, 16, 4


def orthonormal_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(columns, rows, generator=generator, dtype=torch.float64))
    return q.t()  # [rows, columns] with orthonormal rows


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    # two equal values and a third of weight 0: still exactly 2; unequal values: between 1 and 2
    assert effective_rank(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(2.0)
    assert 1.0 < effective_rank(torch.tensor([3.0, 1.0])) < 2.0


def test_entropy_and_total_variation():
    one_hot = torch.eye(NUM_B)[[1, 1, 1]]
    assert entropy(one_hot).tolist() == [0.0, 0.0, 0.0]
    assert entropy(torch.full((NUM_B,), 1 / NUM_B)).item() == pytest.approx(math.log(NUM_B))
    assert tv_spread(one_hot) == 0.0 and max_pairwise_tv(one_hot) == 0.0
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert tv_spread(two) == pytest.approx(0.5)  # each is 0.5 away from the mean [0.5, 0.5]
    assert max_pairwise_tv(two) == pytest.approx(1.0)


def test_uniform_router_has_entropy_log_num_B():
    """A router of zeros gives every expert 1/num_B, whatever the input: entropy is log(num_B)."""
    h = torch.randn(5, 7, R)  # 5 samples of 7 tokens
    weights = route(h, torch.zeros(NUM_B, R))
    assert torch.allclose(entropy(weights), torch.full((5,), math.log(NUM_B), dtype=torch.float64))


def test_shortcut_spectra_equal_the_explicit_matrices():
    torch.manual_seed(0)
    A, B = torch.randn(R, IN), torch.randn(NUM_B, R, OUT)
    mixes = torch.softmax(torch.randn(6, NUM_B), dim=-1)
    updates = [0.7 * A.t().double() @ torch.einsum("e,ero->ro", m.double(), B.double()) for m in mixes]
    explicit_stacked = torch.linalg.svdvals(torch.cat(updates) / math.sqrt(len(updates)))
    stacked = lily_stacked_singular_values(A, B, mixes, 0.7)
    assert torch.allclose(stacked, explicit_stacked[: stacked.numel()], atol=1e-10)
    per_input = lily_update_singular_values(A, B, mixes, 0.7)
    for values, update in zip(per_input, updates, strict=True):
        assert torch.allclose(values, torch.linalg.svdvals(update)[:R], atol=1e-10)
    down, up = torch.randn(R, IN), torch.randn(OUT, R)
    assert torch.allclose(lora_singular_values(down, up, 0.5), torch.linalg.svdvals(0.5 * (up @ down)).double()[:R])


def test_router_forced_to_one_expert_stays_within_rank_r():
    torch.manual_seed(1)
    A, B = torch.randn(R, IN), torch.randn(NUM_B, R, OUT)
    mixes = torch.eye(NUM_B)[[2] * 8]  # every input: expert 2 only
    assert entropy(mixes).max().item() == 0.0
    stacked = lily_stacked_singular_values(A, B, mixes)
    assert (stacked > 1e-9).sum().item() == R
    assert effective_rank(stacked) <= R
    # the stack of one repeated update has exactly that update's spectrum
    assert effective_rank(stacked) == pytest.approx(effective_rank(lily_update_singular_values(A, B, mixes)[0]))


def test_two_experts_mixed_per_input_reach_above_rank_r():
    """Orthonormal A, two experts with orthogonal row spaces: one input each -> the stack has 2r equal values."""
    A = orthonormal_rows(R, IN, seed=0)
    rows = orthonormal_rows(2 * R, OUT, seed=1)
    B = torch.stack([rows[:R], rows[R:]])  # [2, r, out]
    mixes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per_input = lily_update_singular_values(A, B, mixes)
    assert [effective_rank(v) for v in per_input] == pytest.approx([R, R])
    stacked = lily_stacked_singular_values(A, B, mixes)
    assert stacked[: 2 * R].tolist() == pytest.approx([1 / math.sqrt(2)] * (2 * R))
    assert effective_rank(stacked) == pytest.approx(2 * R)
    # mixing both experts the same way for every input stays within rank r
    same = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert effective_rank(lily_stacked_singular_values(A, B, same)) == pytest.approx(R)
    assert effective_rank(pool_singular_values(B)) == pytest.approx(2 * R)
