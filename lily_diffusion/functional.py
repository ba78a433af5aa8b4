"""Lily's math as plain tensor functions (design §1). Modules only wire parameters to these.

Shapes: x [..., in] with a leading batch dimension when it has two or more dimensions;
A [r, in] (a Linear weight), router [num_B, r], B [num_B, r, out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(h: torch.Tensor, router_weight: torch.Tensor, routing: str = "sample") -> torch.Tensor:
    """Expert weights: softmax of the router logits, averaged over tokens.

    routing="sample": one weight vector per sample, `[batch, num_B]` (`[num_B]` for a 1-D h);
    a sample's weights never depend on the other samples in the batch.
    routing="batch": one vector `[num_B]` averaged over every token of every sample (peft's rule).
    """
    probabilities = F.linear(h, router_weight).softmax(dim=-1)
    if routing == "batch":
        return probabilities.reshape(-1, probabilities.shape[-1]).mean(dim=0)
    if routing != "sample":
        raise ValueError(f"Unknown routing {routing!r}; expected 'sample' or 'batch'.")
    if probabilities.dim() <= 2:
        return probabilities  # a 2-D input has one token per sample
    return probabilities.flatten(1, -2).mean(dim=1)


def mix(weights: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`B_mix = sum_e w_e B_e`: `[num_B] -> [r, out]` or `[batch, num_B] -> [batch, r, out]`."""
    num_B, r, out = B.shape
    mixed = weights @ B.reshape(num_B, r * out)
    return mixed.reshape(*weights.shape[:-1], r, out)


def project_up(h: torch.Tensor, B_mix: torch.Tensor) -> torch.Tensor:
    """`h @ B_mix`, with a per-sample `B_mix` `[batch, r, out]` applied to each sample's tokens."""
    if B_mix.dim() == 2 or h.dim() == 1:
        return h @ B_mix
    if h.dim() == 2:
        return torch.bmm(h.unsqueeze(1), B_mix).squeeze(1)
    tokens = h.reshape(h.shape[0], -1, h.shape[-1])
    return torch.bmm(tokens, B_mix).reshape(*h.shape[:-1], B_mix.shape[-1])


def lily_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    router_weight: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    routing: str = "sample",
) -> torch.Tensor:
    """The adapter's contribution `scaling * (A x) @ B_mix(x)`, computed in the adapter's dtype.

    The experts are mixed first, then one matmul (paper eq. 18): no expert runs separately.
    """
    h = F.linear(x.to(A.dtype), A)
    weights = route(h, router_weight, routing)
    return project_up(h, mix(weights, B)) * scaling
