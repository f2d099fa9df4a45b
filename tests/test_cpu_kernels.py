"""The fused C++ routing kernel computes exactly what the PyTorch routing computes."""
import subprocess
import sys
import warnings

import pytest
import torch

from capsnet import cpu_kernels
from capsnet.layers import DigitCaps
from capsnet.routing import dynamic_routing

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: the kernel is optional")


def _check_against_autograd(u_hat, bias, batch, iters, detach):
    """The kernel's capsules and gradients (u_hat's, bias's) against float64 autograd."""
    inputs = (u_hat,) if bias is None else (u_hat, bias)
    v = cpu_kernels.FusedRouting.apply(u_hat, bias, batch, iters, detach)
    grad = torch.randn_like(v)
    g_kernel = torch.autograd.grad(v, inputs, grad)
    ref_inputs = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref_bias = ref_inputs[1] if bias is not None else None
    ref = dynamic_routing(ref_inputs[0].permute(1, 2, 0, 3), iters, detach_inner=detach, bias=ref_bias)  # [b, j, i, d]
    g_ref = torch.autograd.grad(ref, ref_inputs, grad.double())
    assert torch.allclose(v.double(), ref, atol=1e-6)
    for ours, theirs in zip(g_kernel, g_ref):
        assert ((ours.double() - theirs).norm() / theirs.norm()) < 1e-5


@pytest.mark.parametrize("iters", [1, 2, 3, 5])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("sizes", [(10, 16), (4, 8)])  # the compiled-in MNIST shape and the generic path
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_autograd(iters, detach, sizes, with_bias):
    torch.manual_seed(iters)
    j, d = sizes
    u_hat = (torch.randn(300, 6, j, d) * 0.1).requires_grad_()  # grouped layout [i, b, j, d]
    bias = (torch.randn(j, d) * 0.3).requires_grad_() if with_bias else None
    _check_against_autograd(u_hat, bias, 6, iters, detach)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_with_kernel_matches_layer_without(shared, bias):
    torch.manual_seed(0)
    layer = DigitCaps(in_caps=72, in_dim=8, out_caps=10, out_dim=16, routing_iters=3, types=8, shared=shared,
                      bias=bias)
    if bias:
        with torch.no_grad():
            layer.bias.normal_(0.0, 0.3)  # it starts at 0: give it a value that matters
    u = torch.randn(5, 72, 8, requires_grad=True)
    params = [layer.weight] + ([layer.bias] if bias else [])
    results = []
    for use_kernel in (True, False):
        layer.use_kernel = use_kernel
        layer.zero_grad()
        v = layer(u)
        grads = torch.autograd.grad(v.pow(2).sum(), [u, *params])
        results.append((v, *grads))
    for ours, ref in zip(*results):
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_bf16_kernel_is_close_to_fp32():
    torch.manual_seed(1)
    u_hat = torch.randn(1152, 4, 10, 16) * 0.05
    v32 = cpu_kernels.FusedRouting.apply(u_hat, None, 4, 3, False)
    v16 = cpu_kernels.FusedRouting.apply(u_hat.bfloat16(), None, 4, 3, False)
    assert v16.dtype == torch.float32
    assert ((v16 - v32).norm() / v32.norm()) < 1e-2
    g = torch.randn_like(v32)
    a = u_hat.clone().requires_grad_()
    b = u_hat.bfloat16().requires_grad_()
    g32, = torch.autograd.grad(cpu_kernels.FusedRouting.apply(a, None, 4, 3, False), a, g)
    g16, = torch.autograd.grad(cpu_kernels.FusedRouting.apply(b, None, 4, 3, False), b, g)
    assert g16.dtype == torch.bfloat16
    assert ((g16.float() - g32).norm() / g32.norm()) < 2e-2


@pytest.mark.parametrize("with_bias", [False, True])
def test_inference_path_gives_the_same_capsules(with_bias):
    torch.manual_seed(2)
    u_hat = torch.randn(100, 3, 10, 16) * 0.1
    bias = torch.randn(10, 16) * 0.3 if with_bias else None
    with torch.no_grad():
        v_inference = cpu_kernels.FusedRouting.apply(u_hat, bias, 3, 3, False)
    v_train = cpu_kernels.FusedRouting.apply(u_hat.clone().requires_grad_(), bias, 3, 3, False)
    assert torch.equal(v_inference, v_train.detach())


def test_portable_kernel_without_avx512_matches_autograd(tmp_path, monkeypatch):
    """Most laptops lack AVX-512: build the kernel without it and check the scalar MNIST-shape path."""
    monkeypatch.setenv("CAPSNET_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a compiler without the flag (not x86): skipped below
        lib = cpu_kernels._build(extra_flags=("-mno-avx512f",))
    if lib is None:
        pytest.skip("the compiler could not build without AVX-512")
    monkeypatch.setattr(cpu_kernels, "_lib", lib)
    torch.manual_seed(4)
    u_hat = (torch.randn(200, 3, 10, 16) * 0.1).requires_grad_()
    _check_against_autograd(u_hat, None, 3, 3, False)
    bias = (torch.randn(10, 16) * 0.3).requires_grad_()
    _check_against_autograd(u_hat, bias, 3, 3, False)


def test_loading_the_kernels_leaves_denormals_alone():
    """Linked with -ffast-math, a library turns on flush-to-zero for the process when it loads."""
    code = ("import torch; from capsnet import cpu_kernels\n"
            "assert cpu_kernels.available() and cpu_kernels.fold_available()\n"
            "x = torch.tensor([1e-40]); print((x * 1).item() > 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
