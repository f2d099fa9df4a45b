"""Dynamic routing between capsules (Sabour et al. 2017, Procedure 1)."""
from __future__ import annotations

import torch

# Added under the square root in squash. Without it the gradient of |s| at s = 0 is
# 0/0 = NaN (and a dead primary capsule is exactly zero after a ReLU'd conv); with it the
# gradient is finite everywhere and the length stays below 1 (see tests).
SQUASH_EPS = 1e-7


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors widened to float32; float32 and float64 left as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, written as s * |s| / (1 + |s|^2).

    Half-precision inputs are computed in float32: the ratio loses too much in bf16.
    """
    wide = _wide(s)
    sq = (wide * wide).sum(dim=dim, keepdim=True)
    v = wide * torch.sqrt(sq + SQUASH_EPS) / (1.0 + sq)
    return v.to(s.dtype)


def dynamic_routing(u_hat: torch.Tensor, iterations: int, *, detach_inner: bool = False,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Route predictions from input capsules i to output capsules j.

    u_hat: [b, j, i, d] predictions u_hat_{j|i} (Eq. 2), output capsule first so that
    both sums below are batched matrix products over contiguous memory.
    Returns v: [b, j, d], the output capsules after squashing (Eq. 1).

    The coupling coefficients c_ij are a softmax over the output capsules j (Eq. 3): each
    input capsule distributes one unit of vote among its possible parents.

    With detach_inner, the inner iterations (all but the last) see u_hat without its
    gradient, a common variant; the paper's own code lets gradients through every one.

    bias: [j, d] or None. If given, s_j + bias_j is squashed in every iteration: not in the
    paper's equations, but in the authors' published code (capsnet: --capsule-bias).
    """
    return _route(u_hat, iterations, detach_inner, bias)[0]


def coupling_coefficients(u_hat: torch.Tensor, iterations: int, *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The couplings c_ij used in the last routing iteration: [b, j, i]. For inspection."""
    return _route(u_hat, iterations, False, bias)[1]


def _route(u_hat: torch.Tensor, iterations: int, detach_inner: bool,
           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v [b, j, d], the last iteration's couplings c [b, j, i]) for u_hat [b, j, i, d]."""
    b, j, i, _ = u_hat.shape
    logits = u_hat.new_zeros(b, j, i)  # b_ij, the routing logits, start at 0
    for r in range(iterations):
        last = r == iterations - 1
        inner_detached = detach_inner and not last
        u = u_hat.detach() if inner_detached else u_hat
        c = torch.softmax(logits, dim=1)  # [b, j, i], sums to 1 over j
        s = torch.einsum("bji,bjid->bjd", c, u)  # Eq. 2: s_j = sum_i c_ij u_hat_j|i
        if bias is not None:
            s = s + (bias.detach() if inner_detached else bias).to(s.dtype)  # [j, d] over the batch
        v = squash(s)  # [b, j, d]
        if not last:
            logits = logits + torch.einsum("bjid,bjd->bji", u, v)  # agreement u_hat . v
    return v, c


def dynamic_routing_fusable(u_hat: torch.Tensor, iterations: int, *, detach_inner: bool = False,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same routing for u_hat laid out [b, i, j, d], written as broadcasts and sums.

    Eager, this is slower than dynamic_routing; under torch.compile each iteration becomes one
    fused loop over u_hat (the agreement for input capsule i needs only its own 10 x 16 block),
    so it is the form the compiled model uses. Softmax, sums and squash run in float32.
    """
    b, i, j, _ = u_hat.shape
    logits = _wide(u_hat.new_zeros(b, i, j))  # b_ij
    for r in range(iterations):
        inner_detached = detach_inner and r < iterations - 1
        u = _wide(u_hat.detach() if inner_detached else u_hat)
        c = torch.softmax(logits, dim=2)  # [b, i, j], sums to 1 over j
        s = (c.unsqueeze(-1) * u).sum(dim=1)  # [b, j, d]
        if bias is not None:
            s = s + _wide(bias.detach() if inner_detached else bias)
        v = squash(s)  # [b, j, d]
        if r < iterations - 1:
            logits = logits + (u * v.unsqueeze(1)).sum(dim=-1)
    return v

