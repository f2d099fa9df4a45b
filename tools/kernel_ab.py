"""Probe (not part of capsnet): two builds of the CPU routing kernel, A/B inside whole training steps.

    python tools/kernel_ab.py OLD.cpp NEW.cpp [--steps 60] [--fp32-routing] [--check]

Builds both sources (as capsnet.cpu_kernels does) and runs training steps of the MNIST model
at batch 64 in one process, swapping the kernel every step, so the two medians differ by the
kernel alone and not by the drift between processes, which on a shared VM is as large as the
few percent a kernel change is worth. OLD.cpp can come from git: `git show REV:src/capsnet/
kernels/routing_cpu.cpp > /tmp/old.cpp`. --check first asserts that both builds give bitwise
equal capsules and gradients on random input (for a change meant to keep the arithmetic).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from capsnet import cpu_kernels
from capsnet.bench import training_steps


def build(source: Path):
    cpu_kernels.SOURCE = source
    lib = cpu_kernels._build()
    if lib is None:
        raise SystemExit(f"{source}: could not build the kernel")
    return lib


def same_results(libs: dict, fp32: bool) -> bool:
    """Capsules and gradients of each build, bitwise, for 3 routing iterations with and without
    the inner gradient, and a bias."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if fp32 else torch.bfloat16
    u_hat = (torch.randn(1152, 8, 10, 16, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(10, 16, generator=gen) * 0.3
    grad = torch.randn(8, 10, 16, generator=gen)
    for detach in (False, True):
        outs = []
        for lib in libs.values():
            cpu_kernels._lib = lib
            u, b = u_hat.clone().requires_grad_(), bias.clone().requires_grad_()
            v = cpu_kernels.FusedRouting.apply(u, b, 8, 3, detach)
            outs.append((v, *torch.autograd.grad(v, (u, b), grad)))
        if not all(torch.equal(x, y) for x, y in zip(*outs)):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per build")
    ap.add_argument("--fp32-routing", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    libs = {"old": build(args.old), "new": build(args.new)}
    cpu_kernels._tried = True
    if args.check:
        print("bitwise equal:", same_results(libs, args.fp32_routing))
    run = training_steps(torch.device("cpu"), batch=64, fp32_routing=args.fp32_routing)
    warmup = 8
    ms: dict[str, list[float]] = {"old": [], "new": []}
    for k in range(warmup + 2 * args.steps):
        name = ("old", "new")[k % 2]
        cpu_kernels._lib = libs[name]
        x = run.next_batch()
        t = time.perf_counter()
        run.train(x)
        if k >= warmup:
            ms[name].append((time.perf_counter() - t) * 1e3)
    old, new = statistics.median(ms["old"]), statistics.median(ms["new"])
    print(f"{run.precision}, fp32 routing {args.fp32_routing}, {args.steps} steps each, median ms per step: "
          f"old {old:.1f}, new {new:.1f} ({100 * (new - old) / old:+.1f}%)")


if __name__ == "__main__":
    main()
