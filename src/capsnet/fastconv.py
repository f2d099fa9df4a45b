"""A convolution computed as explicit GEMMs (CapsNet's two convolutions on CPU, in bf16).

The PrimaryCaps convolution (256 -> 256 channels, 9x9, stride 2) is about 95% of CapsNet's
arithmetic. On the CPU in bf16, oneDNN ran its weight gradient at half the rate of a plain GEMM
of the same size on the AMD EPYC VM this project first used, and its forward and input gradient
at a third to a half of it on the Intel Xeon VM (AMX) it uses since 2026-11-29 (docs/speed.md).
So all three products are written out here, around one gather of the input patches (im2col,
channels last, a plain strided copy into a reused buffer):

    forward          out [b*oh*ow, co]        = patches [b*oh*ow, k*k*c] @ W [co, k*k*c]^T
    weight gradient  dW [co, k*k*c]           = grad_out [b*oh*ow, co]^T @ patches
    input gradient   dpatches [b*oh*ow, k*k*c] = grad_out @ W, then folded back onto the image
                     (col2im: every patch added where it came from; cpu_kernels.fold, float32 sums)

The forward's patches are kept for the weight gradient, and the patch gradient is written into
the same buffer once they are used: one 95 MB buffer (bf16, 64 MNIST images) serves the step
(one per thread that runs the layer).

conv1 (1 -> 256 channels, 9x9, stride 1) goes the same way (Conv2d below): its products are
small, but oneDNN took several times as long for them (docs/speed.md), and its output, channels
last, is what PrimaryCaps gathers its patches from without a copy. Its own patches (4 MB) are
gathered again for its weight gradient: by then the PrimaryCaps patches have replaced them.
"""
from __future__ import annotations

import itertools
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import cpu_kernels

# One reusable buffer per thread for the patches and, in the backward pass, their gradient.
# Allocating it afresh each step costs more than the copy itself: the kernel hands over new zeroed
# pages. Each thread has its own (two threads running the model at once would otherwise overwrite
# each other's patches between the copy and the product). Every write takes a number from one
# count shared by all threads, so that a backward pass knows whether the patches its forward
# gathered are still there: not when the layer ran again before it, nor when it runs on another
# thread (whose buffer may hold patches of the same shape).
class _Workspace(threading.local):
    def __init__(self):
        self.flat: torch.Tensor | None = None
        self.generation = 0  # the number of the last write (numbers are unique across threads)


_workspace = _Workspace()
_writes = itertools.count(1)
INFERENCE_CHUNK = 64  # images per product without a gradient: the buffer stays a training step's size


def _buffer(shape, dtype, device) -> torch.Tensor:
    """This thread's buffer as a tensor of this shape, grown when it is too small."""
    n, ws = math.prod(shape), _workspace
    flat = ws.flat
    if flat is None or flat.numel() < n or flat.dtype != dtype or flat.device != device \
            or (flat.is_inference() and not torch.is_inference_mode_enabled()):  # not writable outside
        ws.flat = None
        flat = ws.flat = torch.empty(n, dtype=dtype, device=device)
    ws.generation = next(_writes)  # the caller is about to overwrite it
    return flat[:n].view(shape)


def _held(generation: int, shape) -> torch.Tensor | None:
    """This thread's buffer as last written, if that write was number `generation` (whose shape
    the caller knows)."""
    ws = _workspace
    if ws.generation != generation:
        return None
    return ws.flat[:math.prod(shape)].view(shape)


def _output_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def im2col_nhwc(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """x: [b, c, h, w] -> patches [b * oh * ow, kernel * kernel * c], ordered (kh, kw, c).

    The result lives in a shared buffer that the next call overwrites: use it at once.
    """
    b, c, h, w = x.shape
    oh, ow = _output_size(h, kernel, stride), _output_size(w, kernel, stride)
    nhwc = x.permute(0, 2, 3, 1).contiguous()  # free when x is already channels_last
    windows = nhwc.as_strided((b, oh, ow, kernel, kernel, c),
                              (h * w * c, stride * w * c, stride * c, w * c, c, 1))
    cols = _buffer((b, oh, ow, kernel, kernel, c), x.dtype, x.device)
    cols.copy_(windows)  # into a fresh buffer: much faster than reshape() of the strided view
    return cols.view(b * oh * ow, kernel * kernel * c)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[co, c, k, k] -> [co, k * k * c], ordered as the patches (kh, kw, c)."""
    co, c, k, _ = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(co, k * k * c)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[b, co, oh, ow] -> [b * oh * ow, co] (a view when t is channels last)."""
    b, co, oh, ow = t.shape
    return t.permute(0, 2, 3, 1).reshape(b * oh * ow, co)


def conv_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """d loss / d weight for conv2d(x, weight, stride=stride), no padding: [co, c, k, k]."""
    cols = im2col_nhwc(x, kernel, stride)  # [b*oh*ow, k*k*c]
    return _weight_grad(cols, _rows(grad_out), kernel, x.shape[1])


def _weight_grad(cols: torch.Tensor, g: torch.Tensor, kernel: int, channels: int) -> torch.Tensor:
    co = g.shape[1]
    return (g.t() @ cols).view(co, kernel, kernel, channels).permute(0, 3, 1, 2)  # [co, c, k, k]


def fold_nhwc(patches: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """patches [b, oh, ow, k, k, c] -> [b, height, width, c], every patch added back where it was
    taken from (im2col's adjoint), summed in float32 and returned in the patches' dtype."""
    with torch.profiler.record_function("capsnet::fold"):  # named in tools/step_profile.py
        return _fold_nhwc(patches, height, width, stride)


def _fold_nhwc(patches: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    if patches.dtype == torch.bfloat16 and patches.device.type == "cpu" and cpu_kernels.fold_available():
        return cpu_kernels.fold(patches.contiguous(), height, width, stride)
    b, oh, ow, k, _, c = patches.shape
    out = patches.new_zeros(b, height, width, c, dtype=torch.promote_types(patches.dtype, torch.float32))
    span_h, span_w = (oh - 1) * stride + 1, (ow - 1) * stride + 1
    for kh in range(k):  # k*k strided adds: the kernel's work as tensor operations
        for kw in range(k):
            out[:, kh:kh + span_h:stride, kw:kw + span_w:stride, :] += patches[:, :, :, kh, kw, :]
    return out.to(patches.dtype)


def conv_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, height: int, width: int,
                    stride: int) -> torch.Tensor:
    """d loss / d x for conv2d(x, weight, stride=stride), no padding, x of size height x width:
    [b, c, height, width] (channels-last strides)."""
    return _input_grad(grad_out, _weight_matrix(weight), weight.shape[1], height, width, stride)


def _input_grad(grad_out: torch.Tensor, wm: torch.Tensor, channels: int, height: int, width: int,
                stride: int) -> torch.Tensor:
    """conv_input_grad with the weights as _weight_matrix gives them, wm [co, k*k*c]."""
    b, co, oh, ow = grad_out.shape
    k = math.isqrt(wm.shape[1] // channels)
    cols = _buffer((b, oh, ow, k, k, channels), grad_out.dtype, grad_out.device)
    torch.mm(_rows(grad_out), wm, out=cols.view(b * oh * ow, k * k * channels))  # [b*oh*ow, k*k*c]
    return fold_nhwc(cols, height, width, stride).permute(0, 3, 1, 2)


def _gemm_forward(x: torch.Tensor, wm: torch.Tensor, bias: torch.Tensor | None, stride: int, *,
                  chunk: int | None = None) -> torch.Tensor:
    """conv2d(x, weight, bias, stride), no padding, with wm = _weight_matrix(weight) [co, k*k*c]:
    [b, co, oh, ow] with channels-last strides.
    chunk: images per product (default all: their patches stay in the buffer for the backward pass)."""
    b, c, h, w = x.shape
    co, k = wm.shape[0], math.isqrt(wm.shape[1] // c)
    oh, ow = _output_size(h, k, stride), _output_size(w, k, stride)
    out = torch.empty((b, co, oh, ow), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)  # not a view: it may be changed in place
    flat = out.permute(0, 2, 3, 1).view(b * oh * ow, co)  # the same memory, a row per output position
    step = chunk or b
    for start in range(0, b, step):
        cols = im2col_nhwc(x[start:start + step], k, stride)  # [images*oh*ow, k*k*c]
        rows = flat[start * oh * ow:(start + step) * oh * ow]
        torch.mm(cols, wm.t(), out=rows) if bias is None else torch.addmm(bias, cols, wm.t(), out=rows)
    return out


class _GemmConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride: int):
        wm = _weight_matrix(weight)  # [co, k*k*c]: made once, for the forward and the input gradient
        out = _gemm_forward(x, wm, bias, stride)
        ctx.save_for_backward(x, wm)
        ctx.stride, ctx.generation = stride, _workspace.generation  # the buffer holds x's patches
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, wm = ctx.saved_tensors
        s, (b, c, h, w) = ctx.stride, x.shape
        k = math.isqrt(wm.shape[1] // c)
        grad_x = grad_w = grad_b = None
        g = _rows(grad_out)  # [b*oh*ow, co]
        if ctx.needs_input_grad[1]:
            oh, ow = _output_size(h, k, s), _output_size(w, k, s)
            cols = _held(ctx.generation, (b, oh, ow, k, k, c))
            if cols is None:  # the layer ran again before this backward pass: gather the patches anew
                cols = im2col_nhwc(x, k, s)
            grad_w = _weight_grad(cols.view(b * oh * ow, k * k * c), g, k, c).to(wm.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0).to(wm.dtype)
        if ctx.needs_input_grad[0]:  # last: its patch gradient overwrites the patches
            grad_x = _input_grad(grad_out, wm, c, h, w, s)
        return grad_x, grad_w, grad_b, None


@torch.compiler.disable  # hand-written products and a shared buffer: dynamo leaves them to run eagerly
def _gemm_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    dt = torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))):
            return _gemm_forward(x, _weight_matrix(weight), bias, stride, chunk=INFERENCE_CHUNK)  # nothing kept
        return _GemmConv.apply(x, weight, bias, stride)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, *,
           gemm: bool = True) -> torch.Tensor:
    """F.conv2d (square kernel, no padding), computed as GEMMs where that pays: bf16 on the CPU.

    gemm=False gives the library's convolution everywhere."""
    low = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if not (gemm and x.device.type == "cpu" and (low or x.dtype == torch.bfloat16)):
        return F.conv2d(x, weight, bias, stride=stride)
    return _gemm_conv(x, weight, bias, stride)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (square kernel and stride, no padding) computed by conv2d above: as GEMMs in bf16
    on the CPU, the library's convolution elsewhere. Its output there has channels-last strides.

    Same parameters and state dict as nn.Conv2d; set .gemm = False for the library's everywhere."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        self.gemm = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride[0], gemm=self.gemm)
