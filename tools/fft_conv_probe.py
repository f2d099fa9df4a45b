"""Probe (not part of capsnet): would the PrimaryCaps convolution train faster on this CPU in the
frequency domain?

The convolution (256 -> 256 channels, 9x9, stride 2, 20x20 -> 6x6) is a correlation; on a 20x20
circle it has no wrap-around for the outputs kept, so it is one product per frequency bin:
Z(k) = sum_c X_c(k) conj(W_oc(k)) over the 20 x 11 bins of a real 2-D FFT, a batched complex
matrix product with 3.3x fewer multiply-adds than the direct convolution. This script checks the
formulation's error against float64, times forward + backward at the recipes' batch of 64 against
capsnet's convolution (fastconv), and times the pieces that decide the outcome.

    .venv/bin/python tools/fft_conv_probe.py        (on an idle CPU; about a minute)
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from capsnet import fastconv
from capsnet.runtime import configure

B, C, O, SIZE, KERNEL, STRIDE = 64, 256, 256, 20, 9, 2
GRID = (SIZE - KERNEL) // STRIDE + 1  # 6
BINS = SIZE * (SIZE // 2 + 1)  # 220 frequency bins of rfft2 on 20 x 20


def fft_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """conv2d(x, w, bias, stride 2) through the FFT: transforms in float32, the products in bf16."""
    b = x.shape[0]
    xf = torch.fft.rfft2(x.float())  # [b, c, 20, 11]
    wf = torch.fft.rfft2(w.float(), s=(SIZE, SIZE))  # [o, c, 20, 11], the kernel zero-padded
    xs = torch.cat([xf.real, xf.imag], 1).reshape(b, 2 * C, BINS).permute(2, 0, 1)  # [bins, b, 2c]
    wr = wf.real.reshape(O, C, BINS).permute(2, 1, 0)  # [bins, c, o]
    wi = wf.imag.reshape(O, C, BINS).permute(2, 1, 0)
    # X conj(W) as one real product: [xr | xi] @ [[wr, -wi], [wi, wr]] = [re | im]
    m = torch.cat([torch.cat([wr, -wi], 2), torch.cat([wi, wr], 2)], 1)  # [bins, 2c, 2o]
    z = torch.bmm(xs.to(torch.bfloat16), m.to(torch.bfloat16)).float()  # [bins, b, 2o]
    z = z.view(SIZE, SIZE // 2 + 1, b, 2, O)
    zc = torch.complex(z[..., 0, :], z[..., 1, :]).permute(2, 3, 0, 1)  # [b, o, 20, 11]
    full = torch.fft.irfft2(zc, s=(SIZE, SIZE))  # [b, o, 20, 20]; rows/cols 0..11 are valid
    return full[:, :, 0:STRIDE * GRID:STRIDE, 0:STRIDE * GRID:STRIDE] + bias.view(1, -1, 1, 1)


def capsnet_conv(x, w, bias):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fastconv.conv2d(x, w, bias, STRIDE)


def median_ms(fn, reps: int = 5, warmup: int = 2) -> float:
    times = []
    for i in range(reps + warmup):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    configure(torch.device("cpu"), "bf16")  # as training sets up the CPU (glibc keeps freed memory)
    torch.manual_seed(0)
    x = torch.relu(torch.randn(B, C, SIZE, SIZE))
    w = torch.empty(O, C, KERNEL, KERNEL).uniform_(-1, 1) / math.sqrt(C * KERNEL * KERNEL)
    bias = torch.randn(O) * 0.1
    ref = F.conv2d(x.double(), w.double(), bias.double(), stride=STRIDE)
    rel = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    with torch.no_grad():
        print(f"error against float64: direct bf16 {rel(capsnet_conv(x, w, bias)):.4%}, "
              f"FFT (bf16 products) {rel(fft_conv(x, w, bias)):.4%}")

    def train_pass(conv):
        def run():
            xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, bias))
            conv(xx, ww, bb).float().square().sum().backward()
        return run

    print(f"forward + backward, batch {B}: capsnet {median_ms(train_pass(capsnet_conv)):.1f} ms, "
          f"FFT {median_ms(train_pass(fft_conv)):.1f} ms")
    a = torch.randn(BINS, B, 2 * C, dtype=torch.bfloat16)
    m = torch.randn(BINS, 2 * C, 2 * O, dtype=torch.bfloat16)
    at = a.transpose(1, 2).contiguous()
    wide = torch.randn(B, C, SIZE, SIZE)
    spectrum = torch.randn(B, O, SIZE, SIZE // 2 + 1, dtype=torch.complex64)
    print("pieces of the FFT version:")
    print(f"  products, forward ({BINS} x [{B}, {2 * C}] @ [{2 * C}, {2 * O}], bf16): {median_ms(lambda: torch.bmm(a, m)):.1f} ms"
          f" (at 390 GFLOP/s: {2 * BINS * B * 4 * C * O / 390e9 * 1000:.1f} ms)")
    print(f"  products, weight gradient ({BINS} x [{2 * C}, {B}] @ [{B}, {2 * O}]): {median_ms(lambda: torch.bmm(at, a)):.1f} ms")
    print(f"  rfft2 of the weights, padded to {SIZE} x {SIZE}: {median_ms(lambda: torch.fft.rfft2(w, s=(SIZE, SIZE))):.1f} ms")
    print(f"  rfft2 of the input: {median_ms(lambda: torch.fft.rfft2(wide)):.1f} ms, "
          f"irfft2 of the output: {median_ms(lambda: torch.fft.irfft2(spectrum, s=(SIZE, SIZE))):.1f} ms")


if __name__ == "__main__":
    main()
