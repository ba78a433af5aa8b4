"""Lily's math as plain tensor functions: h = A x, p = softmax(router h) averaged over the tokens of each sample
(or of the whole batch), y = scaling * h (sum_e p_e B_e). Modules only wire parameters to these.

Shapes: x [..., in] with a leading batch dimension when it has two or more dimensions;
A [r, in] (a Linear weight), router [num_B, r], B [num_B, r, out].

Speed (see benchmarks/results/profile.md): the experts are mixed once per sample (`mix` works on
`[batch, num_B]` weights, never per token), `scaling` is folded into those weights, and
`add_lily_` adds `h @ B_mix` to the base layer's output with one GEMM (`addmm`/`baddbmm` with
beta=1), in place when no graph is recorded, so no activation-sized temporary is made for the
scaled delta or for the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(h: torch.Tensor, router_weight: torch.Tensor, routing: str = "sample") -> torch.Tensor:
    """Expert weights: softmax of the router logits, averaged over tokens.

    routing="sample": one weight vector per sample, `[batch, num_B]` (`[num_B]` for a 1-D h);
    a sample's weights never depend on the other samples in the batch.
    routing="batch": one vector `[num_B]` averaged over every token of every sample (peft's rule).

    The logits are computed transposed, `[num_B, tokens]`, and the softmax runs over dim 0: with
    num_B (8) far below the SIMD width, a softmax over a short last dim is ~15x slower on CPU
    (forward and backward); the values are the same.
    """
    if routing not in ("sample", "batch"):
        raise ValueError(f"Unknown routing {routing!r}; expected 'sample' or 'batch'.")
    if h.dim() == 1:
        return F.linear(h, router_weight).softmax(dim=-1)
    tokens = h.reshape(-1, h.shape[-1])
    probabilities = F.linear(router_weight, tokens).softmax(dim=0)  # [num_B, all tokens]
    if routing == "batch":
        return probabilities.mean(dim=1)
    batch = h.shape[0]
    return probabilities.reshape(probabilities.shape[0], batch, -1).mean(dim=2).t()


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


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type`; False for devices autocast does not know (meta, fake tensors).

    `torch.is_autocast_enabled("meta")` raises rather than answering, and the meta device is how a model is
    built and measured without memory (FLOP counts, shapes).
    """
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def down_project(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """`h = A x` in the adapter's dtype.

    Under autocast the input is left as it is: autocast casts both operands of the matmul itself,
    so casting x to fp32 first would only add two activation-sized copies.
    """
    if x.dtype != A.dtype and not autocast_enabled(x.device.type):
        x = x.to(A.dtype)
    return F.linear(x, A)


def add_project_up(result: torch.Tensor, h: torch.Tensor, B_mix: torch.Tensor) -> torch.Tensor:
    """`result + h @ B_mix`, as one GEMM with beta=1 (`addmm`/`baddbmm`) where the dtypes agree.

    Without autograd the sum is written into `result` (the base layer's fresh output). With
    autograd it is a new tensor: `F.linear` returns a view for 3-D inputs with a bias, and an
    in-place op on a view makes autograd copy the whole gradient (CopySlices) in the backward.
    Mixed dtypes (fp32 adapter, half-precision base, no autocast) add the fp32 product with type
    promotion: computed in fp32 and rounded once, with no half-precision copy of the delta.
    """
    inplace = not torch.is_grad_enabled() or not (result.requires_grad or h.requires_grad or B_mix.requires_grad)
    if result.dtype == h.dtype == B_mix.dtype and result.is_contiguous():
        r, out = B_mix.shape[-2:]
        if B_mix.dim() == 2:  # one mix for every token: [tokens, r] @ [r, out]
            base, tokens = result.view(-1, out), h.reshape(-1, r)
            summed = base.addmm_(tokens, B_mix) if inplace else torch.addmm(base, tokens, B_mix)
        else:  # one mix per sample: [batch, tokens, r] @ [batch, r, out]
            base, tokens = result.view(B_mix.shape[0], -1, out), h.reshape(B_mix.shape[0], -1, r)
            summed = base.baddbmm_(tokens, B_mix) if inplace else torch.baddbmm(base, tokens, B_mix)
        return result if inplace else summed.view(result.shape)
    delta = project_up(h, B_mix)
    return result.add_(delta) if inplace or result.dtype != delta.dtype else result + delta


def add_lily_(
    result: torch.Tensor,
    h: torch.Tensor,
    router_weight: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    routing: str = "sample",
) -> torch.Tensor:
    """`result += scaling * h @ B_mix(h)` in place (the base output plus the adapter), returned.

    `scaling` multiplies the `[batch, num_B]` expert weights, not an activation-sized tensor.
    """
    weights = route(h, router_weight, routing)
    if scaling != 1.0:
        weights = weights * scaling
    return add_project_up(result, h, mix(weights, B))


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
    h = down_project(x, A)
    weights = route(h, router_weight, routing)
    return project_up(h, mix(weights * scaling, B))
