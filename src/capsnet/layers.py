"""Capsule layers: squash, PrimaryCaps, DigitCaps. Pure modules: no devices, no globals."""
from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels, fastconv
from .routing import dynamic_routing, dynamic_routing_fusable, squash


BIAS_INIT = 0.1  # DigitCaps' optional bias starts here (the authors' code: every bias 0.1)


class PrimaryCaps(nn.Module):
    """A convolution whose output channels are grouped into capsules, then squashed.

    [b, c, h, w] -> [b, types * grid * grid, dim]; capsule index i = (type, row, col).
    """

    def __init__(self, *, in_channels: int, types: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.types, self.dim = types, dim
        self.conv = fastconv.Conv2d(in_channels, types * dim, kernel, stride=stride)  # GEMMs on CPU in bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # [b, types * dim, g, g]
        b, _, g, _ = out.shape
        out = out.view(b, self.types, self.dim, g, g)
        out = out.permute(0, 1, 3, 4, 2).reshape(b, self.types * g * g, self.dim)  # [b, i, d]
        return squash(out)


class DigitCaps(nn.Module):
    """Predictions u_hat_{j|i} = W_ij u_i (Eq. 2), then dynamic routing.

    One matrix W_ij per (input capsule, class) as in the paper, or with shared=True one
    per (capsule type, class): every position of a type uses the same matrices. With bias=True
    a learned bias b_j [out_caps, out_dim] is added to s_j before every squash; it starts at
    0.1, as in the authors' published code (the paper's equations have no bias).
    """

    def __init__(self, *, in_caps: int, in_dim: int, out_caps: int, out_dim: int, routing_iters: int,
                 types: int, shared: bool = False, detach_routing: bool = False, init_range: float = 0.05,
                 bias: bool = False):
        super().__init__()
        self.in_caps, self.types, self.shared = in_caps, types, shared
        self.routing_iters, self.detach_routing = routing_iters, detach_routing
        rows = types if shared else in_caps
        # W: [i or type, e, j*d]: u (in_dim e) times W gives all classes' predictions at once.
        self.weight = nn.Parameter(torch.empty(rows, in_dim, out_caps * out_dim).uniform_(-init_range, init_range))
        self.out_caps, self.out_dim = out_caps, out_dim
        self.bias = nn.Parameter(torch.full((out_caps, out_dim), BIAS_INIT)) if bias else None
        self.use_kernel = True  # the fused C++ routing on CPU where it builds (cpu_kernels)

    def grouped_predictions(self, u: torch.Tensor) -> torch.Tensor:
        """u: [b, i, e] -> u_hat: [groups, b * P, j, d], one batched matmul over the matrices.

        groups = i and P = 1 with a matrix per capsule; groups = types and P = positions per
        type with shared matrices (capsule i = (type, position)).
        """
        b, i, e = u.shape
        j, d = self.out_caps, self.out_dim
        if self.shared:
            t = self.types
            u_g = u.view(b, t, i // t, e).permute(1, 0, 2, 3).reshape(t, b * (i // t), e)  # [t, b*pos, e]
        else:
            u_g = u.transpose(0, 1)  # [i, b, e]
        return torch.bmm(u_g, self.weight).view(u_g.shape[0], u_g.shape[1], j, d)

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        """u: [b, i, e] -> u_hat: [b, j, i, d]."""
        b, i, _ = u.shape
        g = self.grouped_predictions(u)  # [groups, b*P, j, d]
        u_hat = g.view(g.shape[0], b, -1, self.out_caps, self.out_dim)  # [groups, b, P, j, d]
        return u_hat.permute(1, 3, 0, 2, 4).reshape(b, self.out_caps, i, self.out_dim)

    def fusable_predictions(self, u: torch.Tensor) -> torch.Tensor:
        """u: [b, i, e] -> u_hat: [b, i, j, d] as broadcast and sum, which torch.compile fuses
        into one loop (eager, it would build a [b, i, e, j*d] temporary: use predictions())."""
        b, i, e = u.shape
        w = self.weight.float()
        if self.shared:
            w = w.repeat_interleave(i // self.types, dim=0)  # [i, e, j*d]
        u_hat = (u.float().unsqueeze(-1) * w).sum(dim=2)  # [b, i, j*d]
        return u_hat.to(u.dtype).view(b, i, self.out_caps, self.out_dim)  # stored in u's precision

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: [b, i, e] primary capsules -> v: [b, j, d] output capsules."""
        if (self.use_kernel and u.device.type == "cpu" and not torch.compiler.is_compiling()
                and cpu_kernels.available()):
            return cpu_kernels.FusedRouting.apply(self.grouped_predictions(u), self.bias, u.shape[0],
                                                  self.routing_iters, self.detach_routing)
        if torch.compiler.is_compiling():  # one fused pass per routing iteration
            return dynamic_routing_fusable(self.fusable_predictions(u), self.routing_iters,
                                           detach_inner=self.detach_routing, bias=self.bias)
        return dynamic_routing(self.predictions(u), self.routing_iters, detach_inner=self.detach_routing,
                               bias=self.bias)
