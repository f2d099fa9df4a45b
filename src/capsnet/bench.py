"""Timed training steps and inference on synthetic MNIST-shaped data -> one JSON-able dict.

A training step here is what `capsnet train` does per batch: uint8 images to float, a random
shift per image, forward, margin + reconstruction loss, backward, Adam. Times are medians over
the timed steps, after warm-up steps that also absorb torch.compile's compilation.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ModelConfig, TrainConfig
from .data.augment import augment
from .errors import CapsNetError
from .model import CapsNet
from .runtime import autocast, configure, describe, resolve_precision
from .train import compile_model, make_optimizer, step, to_input


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class TrainingSteps:
    """The model, set up as run_bench times it, and its steps on one synthetic batch."""
    model: CapsNet
    images: torch.Tensor  # uint8 [batch, 1, 28, 28]
    precision: str
    routing: str  # what routes: "C++ kernel", "torch.compile" or "PyTorch ops"
    compiled: bool
    next_batch: Callable[[], torch.Tensor]  # the batch freshly shifted, as a float tensor
    train: Callable[[torch.Tensor], None]  # one training step on it (loss, backward, Adam)


def training_steps(device: torch.device, *, precision: str = "auto", batch: int = 128, compile: bool = True,
                   compile_mode: str = "layer", baseline: bool = False, frozen_conv1: bool = False,
                   fp32_routing: bool = False, seed: int = 0) -> TrainingSteps:
    """What `capsnet bench` times, ready to run (also used by the probes in tools/); the flags as run_bench's."""
    precision = resolve_precision(precision, device)
    configure(device, precision, keep_memory=not baseline)
    torch.manual_seed(seed)
    model = CapsNet(ModelConfig(fp32_routing=fp32_routing)).to(device)
    model.conv1.requires_grad_(not frozen_conv1)
    if baseline:
        for conv in (model.conv1, model.primary.conv):
            conv.gemm = False
        model.digits.use_kernel = False
        compile = False
    if compile:
        compile_model(model, compile_mode)
    from . import cpu_kernels

    if device.type == "cpu" and model.digits.use_kernel and cpu_kernels.available() and \
            not (compile and compile_mode != "layer"):
        routing = "C++ kernel"
    else:
        routing = "torch.compile" if compile else "PyTorch ops"
    cfg = TrainConfig(batch_size=batch)
    optimizer = make_optimizer(model, cfg, device, fused=not baseline)
    gen = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=gen, device=device)
    labels = torch.randint(0, 10, (batch,), generator=gen, device=device)

    def next_batch() -> torch.Tensor:
        return augment(to_input(images, device), cfg, gen)

    def train(x: torch.Tensor) -> None:
        step(model, x, labels, cfg, precision, optimizer)

    return TrainingSteps(model, images, precision, routing, compile, next_batch, train)


def run_bench(device: torch.device, *, precision: str = "auto", batch: int = 128, steps: int = 10,
              warmup: int = 3, compile: bool = True, compile_mode: str = "layer", baseline: bool = False,
              frozen_conv1: bool = False, fp32_routing: bool = False, seed: int = 0) -> dict:
    """Time training and inference (classification: no decoder). baseline=True measures the plain
    formulation this project started from (library convolution gradients, routing as PyTorch
    operations, no compilation, unfused Adam, glibc's default allocator settings) for comparison.
    frozen_conv1=True times the steps after `train --freeze-conv1-after` has frozen conv1;
    fp32_routing=True builds the model as `train --fp32-routing` does (u_hat and routing in float32)."""
    s = training_steps(device, precision=precision, batch=batch, compile=compile, compile_mode=compile_mode,
                       baseline=baseline, frozen_conv1=frozen_conv1, fp32_routing=fp32_routing, seed=seed)
    model, images, precision, compile = s.model, s.images, s.precision, s.compiled

    def train_step():
        s.train(s.next_batch())

    model.train()
    t_train = _median_seconds(train_step, steps, warmup, device)
    train_peak = peak_memory_mb(device)

    @torch.no_grad()
    def eval_step():
        with autocast(device, precision):
            model(to_input(images, device), reconstruct=False)

    model.eval()
    t_eval = _median_seconds(eval_step, steps, warmup, device)
    return {"train_img_s": round(batch / t_train, 1), "eval_img_s": round(batch / t_eval, 1),
            "train_step_ms": round(t_train * 1000, 1), "peak_mem_mb": round(train_peak, 1),
            "precision": precision, "batch": batch, "threads": torch.get_num_threads(), "device": str(device),
            "device_name": describe(device), "torch": torch.__version__, "routing": s.routing,
            "compile": compile_mode if compile else "off", "formulation": "baseline" if baseline else "capsnet",
            "conv1": "frozen" if frozen_conv1 else "trains", "fp32_routing": fp32_routing}


def run_in_subprocess(args: list[str]) -> dict:
    """One bench in a fresh process, so each row's peak memory is its own."""
    proc = subprocess.run([sys.executable, "-m", "capsnet", "bench", "--json", *args], capture_output=True, text=True)
    if proc.returncode != 0:  # the child's own one-line error, or how it ended
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        raise CapsNetError(f"bench {' '.join(args)}: {why.removeprefix('capsnet: error: ')}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    head = f"{'formulation':<36} {'precision':<9} {'batch':>5} {'train img/s':>11} {'eval img/s':>10} " \
           f"{'step ms':>8} {'peak MiB':>9}  device"
    lines = [head]
    for r in rows:
        name = r["formulation"] + (", conv1 frozen" if r.get("conv1") == "frozen" else "") + \
            (", fp32 routing" if r.get("fp32_routing") else "")
        lines.append(f"{name:<36} {r['precision']:<9} {r['batch']:>5} {r['train_img_s']:>11.1f} "
                     f"{r['eval_img_s']:>10.1f} {r['train_step_ms']:>8.1f} {r['peak_mem_mb']:>9.0f}  "
                     f"{r['device_name']}")
    return "\n".join(lines)
