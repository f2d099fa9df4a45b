"""A convolution whose weight gradient is one explicit GEMM (the PrimaryCaps conv on CPU, bf16).

The PrimaryCaps convolution (256 -> 256 channels, 9x9, stride 2) is about 95% of CapsNet's
arithmetic. oneDNN runs its forward and input gradient near the bf16 GEMM rate on CPU but its
weight gradient at about half (measured: 273 ms for 128 images, against 152 ms here). So the
forward and the input gradient stay with the library, and the weight gradient is written out:
gather the input patches once (im2col, channels last, a plain strided copy) and multiply.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# One reusable buffer for the patches (191 MB in bf16 for 128 MNIST images). Allocating it
# afresh each step costs more than the copy itself: the kernel hands over new zeroed pages.
_workspace: dict[str, torch.Tensor] = {}


def _buffer(shape, dtype, device) -> torch.Tensor:
    buf = _workspace.get("cols")
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        _workspace.pop("cols", None)
        buf = _workspace["cols"] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def im2col_nhwc(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """x: [b, c, h, w] -> patches [b * oh * ow, kernel * kernel * c], ordered (kh, kw, c).

    The result lives in a shared buffer that the next call overwrites: use it at once.
    """
    b, c, h, w = x.shape
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    nhwc = x.permute(0, 2, 3, 1).contiguous()  # free when x is already channels_last
    windows = nhwc.as_strided((b, oh, ow, kernel, kernel, c),
                              (h * w * c, stride * w * c, stride * c, w * c, c, 1))
    cols = _buffer((b, oh, ow, kernel, kernel, c), x.dtype, x.device)
    cols.copy_(windows)  # into a fresh buffer: much faster than reshape() of the strided view
    return cols.view(b * oh * ow, kernel * kernel * c)


def conv_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """d loss / d weight for conv2d(x, weight, stride=stride), no padding: [co, c, k, k]."""
    b, co, oh, ow = grad_out.shape
    cols = im2col_nhwc(x, kernel, stride)  # [b*oh*ow, k*k*c]
    g = grad_out.permute(0, 2, 3, 1).reshape(b * oh * ow, co)  # [b*oh*ow, co]
    return (g.t() @ cols).view(co, kernel, kernel, x.shape[1]).permute(0, 3, 1, 2)  # [co, c, k, k]


class _GemmWeightGradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride: int):
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, bias, stride=stride)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        s = ctx.stride
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, [s, s], [0, 0], [1, 1], False,
                                                         [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv_weight_grad(x, grad_out, weight.shape[-1], s).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, *,
           gemm_weight_grad: bool = True) -> torch.Tensor:
    """F.conv2d (square kernel, no padding) with the GEMM weight gradient where it pays: bf16 on CPU."""
    low = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if not (gemm_weight_grad and x.device.type == "cpu" and (low or x.dtype == torch.bfloat16)
            and torch.is_grad_enabled() and weight.requires_grad):
        return F.conv2d(x, weight, bias, stride=stride)
    dt = torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        return _GemmWeightGradConv.apply(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), stride)

