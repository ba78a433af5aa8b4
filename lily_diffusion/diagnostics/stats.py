"""Pure math of `lily-inspect`: entropies, total-variation spread, effective rank, update spectra.

Conventions: a Lily layer has `A` `[r, in]`, an expert pool `B` `[num_B, r, out]` and, for an input x,
expert weights `p(x)` `[num_B]`; its update is the matrix `ΔW(x) = scaling · Aᵀ · B_mix(x)` `[in, out]`
with `B_mix(x) = Σ_e p_e(x) B_e`. A LoRA layer has `down` `[r, in]` and `up` `[out, r]`; its update
`ΔW = scale · up · down` is the same for every input. Every spectrum is computed in float64.
"""

from __future__ import annotations

import math

import torch


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each distribution along the last dimension (`0 · log 0 = 0`)."""
    p = p.to(torch.float64)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=-1)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: `exp(H(σ / Σσ))`, from 1 (one direction) to the count of equal σ.

    An all-zero spectrum (an update that is exactly zero) has effective rank 0.
    """
    values = singular_values.to(torch.float64).clamp_min(0)
    total = values.sum()
    if total <= 0:
        return 0.0
    return math.exp(entropy(values / total).item())


def tv_spread(mixes: torch.Tensor) -> float:
    """Mean total-variation distance of each expert mix `[n, num_B]` from their mean mix.

    0 when every input gets the same mix (a static adapter in disguise); at most `1 - 1/n`.
    """
    mixes = mixes.to(torch.float64)
    return (0.5 * (mixes - mixes.mean(dim=0)).abs().sum(dim=-1)).mean().item()


def max_pairwise_tv(mixes: torch.Tensor) -> float:
    """The largest total-variation distance between two of the mixes `[n, num_B]` (0 to 1)."""
    mixes = mixes.to(torch.float64)
    return (0.5 * (mixes[:, None, :] - mixes[None, :, :]).abs().sum(dim=-1)).max().item()


def _a_factor(A: torch.Tensor) -> torch.Tensor:
    """`R` `[r, r]` with `Aᵀ = Q R`, Q orthonormal: `Aᵀ M` and `R M` have the same singular values."""
    return torch.linalg.qr(A.to(torch.float64).t(), mode="reduced").R


def lily_update_singular_values(
    A: torch.Tensor, B: torch.Tensor, mixes: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """Singular values `[n, r]` of each per-input update `ΔW(x_i) = scaling · Aᵀ · B_mix(x_i)`."""
    R = _a_factor(A)
    mixed = torch.einsum("ne,ero->nro", mixes.to(torch.float64), B.to(torch.float64))
    return torch.linalg.svdvals(scaling * (R @ mixed))


def lily_stacked_singular_values(
    A: torch.Tensor, B: torch.Tensor, mixes: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """Singular values of the per-input updates stacked along the input dimension with weights `1/√n`.

    `M = [ΔW(x_1); …; ΔW(x_n)] / √n` `[n·in, out]`, so `MᵀM` is the mean of `ΔW(x_i)ᵀ ΔW(x_i)`: its rank is
    the dimension of the output space the update reaches over these inputs, up to `min(out, num_B · r)`
    (a LoRA's stays at its rank). Computed as the stack of `R · B_mix(x_i)` `[n·r, out]`, same values.
    """
    R = _a_factor(A)
    mixed = torch.einsum("ne,ero->nro", mixes.to(torch.float64), B.to(torch.float64))
    stacked = (scaling * (R @ mixed)).reshape(-1, B.shape[-1]) / math.sqrt(mixes.shape[0])
    return torch.linalg.svdvals(stacked)


def lora_singular_values(down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of a LoRA update `scale · up · down` (at most `r` non-zero), without forming it."""
    R = _a_factor(down)  # downᵀ = Q R, so up · down = up · Rᵀ · Qᵀ
    return torch.linalg.svdvals(scale * (up.to(torch.float64) @ R.t()))


def matrix_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, in float64."""
    return torch.linalg.svdvals(matrix.to(torch.float64))


def pool_singular_values(B: torch.Tensor) -> torch.Tensor:
    """Singular values of an expert pool `[num_B, r, out]` stacked to `[num_B·r, out]`: what mixing can reach."""
    return matrix_singular_values(B.reshape(-1, B.shape[-1]))
