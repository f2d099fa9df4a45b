import torch
import torch.nn.functional as F

from capsnet import fastconv


def test_im2col_matches_unfold():
    x = torch.randn(2, 5, 11, 11)
    cols = fastconv.im2col_nhwc(x, 3, 2)  # [b*oh*ow, (kh, kw, c)]
    ref = F.unfold(x, 3, stride=2)  # [b, (c, kh, kw), oh*ow]
    ref = ref.view(2, 5, 3, 3, 25).permute(0, 4, 2, 3, 1).reshape(50, 45)
    assert torch.equal(cols, ref)


def test_gemm_weight_gradient_equals_the_library_one():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 20, 20, dtype=torch.float64)
    gy = torch.randn(3, 24, 6, 6, dtype=torch.float64)
    ref = torch.ops.aten.convolution_backward(gy, x, torch.zeros(24, 16, 9, 9, dtype=torch.float64), None, [2, 2],
                                              [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1]
    assert torch.allclose(fastconv.conv_weight_grad(x, gy, 9, 2), ref, atol=1e-10)


def test_bf16_conv_gradients_agree_with_plain_autograd():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 9, stride=2)
    x = torch.randn(4, 16, 20, 20, requires_grad=True)
    grads = []
    for gemm in (True, False):
        conv.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fastconv.conv2d(x, conv.weight, conv.bias, 2, gemm_weight_grad=gemm)
        assert y.dtype == torch.bfloat16 and y.shape == (4, 24, 6, 6)
        (y.float() ** 2).sum().backward()
        grads.append((x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for ours, ref in zip(*grads):
        assert ours.dtype == torch.float32
        assert ((ours - ref).norm() / ref.norm()) < 2e-2  # bf16 rounding, not a different function


def test_fp32_path_is_the_library_convolution():
    conv = torch.nn.Conv2d(3, 4, 3, stride=2)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(fastconv.conv2d(x, conv.weight, conv.bias, 2), conv(x))

