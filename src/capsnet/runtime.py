"""Device and precision, decided once here."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CapsNetError

PRECISIONS = ("auto", "bf16", "fp32", "tf32")


def resolve_device(spec: str | None = "auto", gpu: int | None = None) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N', or the seed's -g N (-1 = CPU)."""
    if gpu is not None:
        spec = "cpu" if gpu < 0 else f"cuda:{gpu}"
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise CapsNetError(f"unknown device {spec!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise CapsNetError(f"unsupported device {spec!r} (use cpu, cuda, cuda:N or auto)")
    if not torch.cuda.is_available():
        raise CapsNetError(f"device {spec!r} asked for, but this machine has no CUDA GPU (use --device cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CapsNetError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def cpu_has_fast_bf16() -> bool:
    """AVX-512 bf16 or AMX: oneDNN then runs bf16 convolutions at about twice the fp32 rate."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise CapsNetError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "tf32" and device.type != "cuda":
        return "fp32"  # TF32 is a GPU's matmul mode: elsewhere the same request is plain float32
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "tf32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees many tensors of a few to 30 MB. By default glibc
    returns such blocks to the kernel, and the next step pays a page fault for every 4 KB
    page it touches again: measured 44,000 faults per step (batch 128), 400 with this, and
    the step ~6% faster (560 -> 525 ms). glibc will not raise its mmap threshold above 32 MB,
    so larger blocks (u_hat in float32 under --fp32-routing: 47 MB at batch 64) would still
    come and go as fresh pages: mmap is turned off altogether, and every block comes from the
    heap, which is kept. Process-wide, so only the command line and the benchmark call it,
    never the library on import. Returns False where it does not apply.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # with mmap off, its threshold is moot
    return bool(mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 1 << 30) and mallopt(m_top_pad, 64 << 20))


def configure(device: torch.device, precision: str, *, keep_memory: bool = True) -> None:
    """Global switches that go with a device and precision: TF32 matmuls on CUDA; on the CPU,
    glibc keeping freed memory (keep_freed_memory) unless keep_memory is False."""
    if device.type == "cpu" and keep_memory:
        keep_freed_memory()
    if device.type == "cuda":
        allow = precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def autocast(device: torch.device, precision: str):
    """bf16 autocast for bf16; a no-op context otherwise. Master weights stay float32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), with ", AMX" where it has AMX's bf16
    tiles (which change what is fast); None where there is no such file."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    name = flags = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name is None:
            name = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = value.split()
    if not name:
        return None
    return name + (", AMX" if flags and "amx_bf16" in flags else "")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores{'; ' + model if model else ''})"


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU).

    On GPUs each process takes the GPU of its local rank. Alone, returns SINGLE unchanged.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
