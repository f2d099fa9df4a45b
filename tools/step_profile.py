"""Probe (not part of capsnet): where a CPU training step's time goes, by operation.

    python tools/step_profile.py [--batch 64] [--steps 10] [--fp32-routing]

Runs training steps of the MNIST model as `capsnet bench` does (synthetic images, the shifts,
the loss, Adam), then profiles --steps more with torch.profiler and prints each operation's
share of the step, grouped by what it computes, with its rate in GFLOP/s where the arithmetic
is known. The profiler adds a little to every call, so small operations read high; the total
without the profiler is printed first.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from capsnet.bench import training_steps


def group(name: str, shapes: list) -> str:
    """An operation (with its input shapes) -> what it computes in CapsNet."""
    first = shapes[0] if shapes else []
    if name == "aten::mkldnn_convolution":
        return "conv1 forward" if first and first[1] == 1 else "PrimaryCaps conv forward"
    if name == "aten::convolution_backward":
        return "conv1 weight gradient" if len(shapes) > 1 and shapes[1] and shapes[1][1] == 1 \
            else "PrimaryCaps conv input gradient"
    mats = [s for s in shapes if len(s) == 2]
    if name in ("aten::mm", "aten::addmm") and len(mats) >= 2:  # capsnet's GEMM convolutions (fastconv)
        a, b = mats[0], mats[1]  # (mm with out= lists the output third)
        if a[1] == 81 and b[0] == 81:  # conv1: patches [b*400, 81 * 1 channel] @ W^T
            return "conv1 forward (GEMM)"
        if b[1] == 81 and a[0] == 256:  # conv1: the output gradient^T @ its patches
            return "conv1 weight gradient (GEMM)"
        if a[1] > 10000:  # patches [b*36, 81*256] @ W^T
            return "PrimaryCaps conv forward (GEMM)"
        if b[1] > 10000:  # ... @ [rows, 81*256]: the output gradient times the patches, or times W
            return "PrimaryCaps conv input gradient (GEMM)" if b[0] == a[1] == 256 and a[0] != 256 \
                else "PrimaryCaps conv weight gradient (GEMM)"
    if name == "capsnet::fold":
        return "PrimaryCaps input gradient fold (C++ or tensor ops)"
    if name == "aten::copy_" and first and len(first) == 6:
        return "conv1 patches (im2col)" if first[-1] == 1 else "PrimaryCaps patches (im2col)"
    if name == "aten::bmm":
        return "u_hat = W u and its gradients"
    if name.startswith("FusedRouting"):
        return "routing kernel, " + ("backward" if "Backward" in name else "forward")
    if "adam" in name.lower():
        return "Adam"
    if name == "aten::copy_":
        return "other copies and casts"
    return "everything else"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fp32-routing", action="store_true")
    args = ap.parse_args()
    run = training_steps(torch.device("cpu"), batch=args.batch, fp32_routing=args.fp32_routing)
    precision = run.precision

    def train_step():
        run.train(run.next_batch())

    for _ in range(8):
        train_step()
    t = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    plain = (time.perf_counter() - t) * 1e3 / args.steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            train_step()
    ms: dict[str, float] = defaultdict(float)
    total = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        self_ms = event.self_cpu_time_total / 1e3 / args.steps
        ms[group(event.key, event.input_shapes)] += self_ms
        total += self_ms
    # The PrimaryCaps convolution: 256 -> 256 channels, 9 x 9, 6 x 6 outputs per image; conv1: 1 -> 256,
    # 9 x 9, 20 x 20 outputs. GFLOP per product.
    conv2_gflop = 2 * args.batch * 36 * 256 * 256 * 81 / 1e9
    conv1_gflop = 2 * args.batch * 400 * 256 * 81 / 1e9
    gflop = {name: conv2_gflop for name in (
        "PrimaryCaps conv forward", "PrimaryCaps conv input gradient", "PrimaryCaps conv weight gradient (GEMM)",
        "PrimaryCaps conv forward (GEMM)", "PrimaryCaps conv input gradient (GEMM)")}
    gflop.update({name: conv1_gflop for name in ("conv1 forward (GEMM)", "conv1 weight gradient (GEMM)")})
    print(f"{precision}, batch {args.batch}, fp32 routing {args.fp32_routing}, {torch.get_num_threads()} threads: "
          f"{plain:.1f} ms per step without the profiler, {total:.1f} ms with it")
    for name, value in sorted(ms.items(), key=lambda kv: -kv[1]):
        rate = f"  {gflop[name] / value * 1e3:5.0f} GFLOP/s" if name in gflop else ""
        print(f"  {name:42s} {value:7.1f} ms  {100 * value / total:5.1f}%{rate}")


if __name__ == "__main__":
    main()
