"""capsnet's C++ kernels for the CPU, built on first use and called via ctypes: the fused routing
(kernels/routing_cpu.cpp) and the fold of a convolution's patch gradient (kernels/fold_cpu.cpp).

Each source is compiled once per machine with the system's C++ compiler into the cache
(~/.cache/capsnet/kernels, or $CAPSNET_CACHE). Where there is no compiler, or the build fails,
`available()` (routing) or `fold_available()` is False and capsnet does the same work with PyTorch
operations instead; nothing else changes. CAPSNET_NO_KERNELS=1 turns both off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "routing_cpu.cpp"
FOLD_SOURCE = SOURCE.with_name("fold_cpu.cpp")
# Compiler flags. The library is linked in a second step without them: linked with -ffast-math,
# GCC adds a start-up routine that turns on flush-to-zero for the whole process when the library
# loads, which would change PyTorch's own arithmetic (denormals) behind the user's back.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c++17", "-ffast-math", "-mprefer-vector-width=512", "-fno-math-errno",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
LINK_FLAGS = ["-shared", "-fopenmp"]
_lib = None
_tried = False
_fold_lib = None
_fold_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("CAPSNET_CACHE") or Path.home() / ".cache" / "capsnet"
    return Path(root) / "kernels"


def _machine() -> str:
    """What -march=native compiles for: the CPU's feature flags (a cache shared between machines
    must not hand one machine's build to another)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def _compile(source_path: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile source_path (or find it in the cache) and load it; None where it cannot be built."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    flags = [*FLAGS, *extra_flags]
    source = source_path.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags, *LINK_FLAGS, _machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source_path.stem}_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        obj = tmp[:-3] + ".o"
        proc = subprocess.run([compiler, *flags, "-c", str(source_path), "-o", obj], capture_output=True, text=True)
        if proc.returncode == 0:
            proc = subprocess.run([compiler, *LINK_FLAGS, obj, "-o", tmp], capture_output=True, text=True)
        Path(obj).unlink(missing_ok=True)
        if proc.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            warnings.warn(f"capsnet: could not build the CPU kernel {source_path.name} "
                          f"({proc.stderr.strip()[:200]}); using PyTorch operations")
            return None
        os.replace(tmp, target)  # atomic: a concurrent process sees the whole library or none
    return ctypes.CDLL(str(target))


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The routing kernel; extra_flags serve the tests (e.g. to build the portable path on an
    AVX-512 machine)."""
    lib = _compile(SOURCE, extra_flags)
    if lib is None:
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.routing_forward.argtypes = [ptr, i32, i64, i64, i64, i64, i32, i32, i32, i32, i32, ptr, ptr, ptr, ptr, i32]
    lib.routing_backward.argtypes = [ptr, i32, i64, i64, i64, i64, i32, i32, i32, i32, i32, ptr, ptr, ptr, ptr,
                                     ptr, i32, i32]
    return lib


def _build_fold(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    lib = _compile(FOLD_SOURCE, extra_flags)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.fold_nhwc_bf16.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, ctypes.c_int]
    return lib


def _first_load(build, what: str) -> ctypes.CDLL | None:
    if os.environ.get("CAPSNET_NO_KERNELS") == "1":
        return None
    try:
        return build()
    except OSError as exc:
        warnings.warn(f"capsnet: CPU {what} kernel unavailable ({exc}); using PyTorch operations")
        return None


def available() -> bool:
    """Whether the routing kernel is there (built or loaded on the first call)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _first_load(_build, "routing")
    return _lib is not None


def fold_available() -> bool:
    """Whether the fold kernel is there (built or loaded on the first call)."""
    global _fold_lib, _fold_tried
    if not _fold_tried:
        _fold_tried = True
        _fold_lib = _first_load(_build_fold, "fold")
    return _fold_lib is not None


def fold(patches: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """patches [b, oh, ow, k, k, c] (bf16, contiguous) -> [b, height, width, c] (bf16): every patch
    added back where it was taken from (col2im), the sums in float32. Needs fold_available()."""
    b, oh, ow, k, _, c = patches.shape
    if not (patches.dtype == torch.bfloat16 and patches.is_contiguous() and patches.device.type == "cpu"
            and (oh - 1) * stride + k <= height and (ow - 1) * stride + k <= width):
        raise ValueError(f"fold needs contiguous bf16 CPU patches that fit a {height} x {width} image, got "
                         f"{tuple(patches.shape)} {patches.dtype} with stride {stride}")
    out = patches.new_empty(b, height, width, c)
    _fold_lib.fold_nhwc_bf16(patches.data_ptr(), out.data_ptr(), b, oh, ow, k, stride, c, height, width,
                             torch.get_num_threads())
    return out


def _layout(u_hat: torch.Tensor, batch: int, groups: int):
    """u_hat as the bmm produced it: [groups, batch * P, J, D] -> (sb, st, sp, P) of row (b, i)."""
    g, bp, j, d = u_hat.shape
    p = bp // batch
    assert u_hat.is_contiguous() and g == groups and bp == batch * p
    return p * j * d, bp * j * d, j * d, p


class FusedRouting(torch.autograd.Function):
    """v [B, J, D] (float32) from u_hat laid out [groups, B * P, J, D] (float32 or bf16), and
    bias [J, D] (float32, added to every s_j before the squash) or None."""

    @staticmethod
    def forward(ctx, u_hat, bias, batch: int, iterations: int, detach_inner: bool):
        groups, _, j, d = u_hat.shape
        n_in = groups * (u_hat.shape[1] // batch)
        sb, st, sp, p = _layout(u_hat, batch, groups)
        bf16 = u_hat.dtype == torch.bfloat16
        assert bf16 or u_hat.dtype == torch.float32
        if bias is not None:
            bias = bias.detach().float().contiguous()
            assert bias.shape == (j, d)
        bias_ptr = None if bias is None else bias.data_ptr()
        v = u_hat.new_empty(batch, j, d, dtype=torch.float32)
        if not any(ctx.needs_input_grad[:2]):  # inference: nothing to keep for a backward pass
            _lib.routing_forward(u_hat.data_ptr(), int(bf16), sb, st, sp, p, batch, n_in, j, d, iterations,
                                 bias_ptr, v.data_ptr(), None, None, torch.get_num_threads())
            return v
        c_save = u_hat.new_empty(iterations, batch, n_in, j, dtype=torch.float32)
        s_save = u_hat.new_empty(iterations, batch, j, d, dtype=torch.float32)
        _lib.routing_forward(u_hat.data_ptr(), int(bf16), sb, st, sp, p, batch, n_in, j, d, iterations,
                             bias_ptr, v.data_ptr(), c_save.data_ptr(), s_save.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(u_hat, c_save, s_save)
        ctx.args = (batch, n_in, iterations, detach_inner, (sb, st, sp, p), bf16, bias is not None)
        return v

    @staticmethod
    def backward(ctx, grad_v):
        u_hat, c_save, s_save = ctx.saved_tensors
        batch, n_in, iterations, detach_inner, (sb, st, sp, p), bf16, has_bias = ctx.args
        grad_v = grad_v.float().contiguous()
        grad_u = torch.empty_like(u_hat)
        _, _, j, d = u_hat.shape
        grad_bias = u_hat.new_zeros(batch, j, d, dtype=torch.float32) if has_bias else None  # per image
        _lib.routing_backward(u_hat.data_ptr(), int(bf16), sb, st, sp, p, batch, n_in, j, d, iterations,
                              c_save.data_ptr(), s_save.data_ptr(), grad_v.data_ptr(), grad_u.data_ptr(),
                              None if grad_bias is None else grad_bias.data_ptr(), int(detach_inner),
                              torch.get_num_threads())
        return grad_u, None if grad_bias is None else grad_bias.sum(dim=0), None, None, None
