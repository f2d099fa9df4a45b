import threading

import pytest
import torch
import torch.nn.functional as F

from capsnet import cpu_kernels, fastconv


def test_im2col_matches_unfold():
    x = torch.randn(2, 5, 11, 11)
    cols = fastconv.im2col_nhwc(x, 3, 2)  # [b*oh*ow, (kh, kw, c)]
    ref = F.unfold(x, 3, stride=2)  # [b, (c, kh, kw), oh*ow]
    ref = ref.view(2, 5, 3, 3, 25).permute(0, 4, 2, 3, 1).reshape(50, 45)
    assert torch.equal(cols, ref)


def _library_grads(x, weight, gy, stride):
    """(d x, d weight) of sum(conv2d(x, weight) * gy), from PyTorch's own convolution backward."""
    return torch.ops.aten.convolution_backward(gy, x, weight, None, [stride, stride], [0, 0], [1, 1], False,
                                               [0, 0], 1, [True, True, False])[:2]


def test_gemm_gradients_equal_the_library_ones():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 20, 20, dtype=torch.float64)
    w = torch.randn(24, 16, 9, 9, dtype=torch.float64)
    gy = torch.randn(3, 24, 6, 6, dtype=torch.float64)
    ref_x, ref_w = _library_grads(x, w, gy, 2)
    assert torch.allclose(fastconv.conv_weight_grad(x, gy, 9, 2), ref_w, atol=1e-10)
    assert torch.allclose(fastconv.conv_input_grad(gy, w, 20, 20, 2), ref_x, atol=1e-10)


@pytest.mark.parametrize("size, kernel, stride", [(20, 9, 2), (11, 3, 2), (12, 3, 3), (7, 2, 1)])
def test_fold_is_the_adjoint_of_im2col(size, kernel, stride):
    """<fold(P), X> = <P, im2col(X)> for every P and X: each patch goes back where it came from,
    also where the last rows and columns of the image are in no patch (12 with 3 and stride 3 is
    not: 11 with 3 and stride 2 is covered, 20 with 9 and stride 2 leaves the last row out)."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, size, size, dtype=torch.float64)
    o = (size - kernel) // stride + 1
    p = torch.randn(2, o, o, kernel, kernel, 5, dtype=torch.float64)
    cols = fastconv.im2col_nhwc(x, kernel, stride).view(p.shape)
    folded = fastconv.fold_nhwc(p, size, size, stride)  # [b, h, w, c]
    assert folded.shape == (2, size, size, 5)
    assert torch.allclose((folded * x.permute(0, 2, 3, 1)).sum(), (p * cols).sum(), rtol=1e-12)


@pytest.mark.skipif(not cpu_kernels.fold_available(), reason="no C++ compiler: the kernel is optional")
@pytest.mark.parametrize("shape, stride", [((3, 6, 6, 9, 9, 256), 2), ((2, 4, 5, 3, 3, 7), 2), ((1, 3, 3, 2, 2, 33), 1)])
def test_fold_kernel_matches_the_float64_sum(shape, stride):
    torch.manual_seed(2)
    b, oh, ow, k, _, c = shape
    h, w = (oh - 1) * stride + k + 1, (ow - 1) * stride + k  # one row that no patch covers
    p = torch.randn(shape).to(torch.bfloat16)
    ref = fastconv.fold_nhwc(p.double(), h, w, stride)  # the tensor-operation path, in float64
    got = cpu_kernels.fold(p, h, w, stride)
    assert got.dtype == torch.bfloat16 and got.shape == (b, h, w, c)
    assert torch.equal(got, ref.to(torch.bfloat16))  # float32 sums of at most 81 terms, rounded once
    assert torch.all(got[:, -1] == 0)


@pytest.mark.parametrize("channels, size, stride, input_grad", [(16, 20, 2, True), (1, 28, 1, False)])
def test_bf16_conv_gradients_agree_with_plain_autograd(channels, size, stride, input_grad):
    """PrimaryCaps' shape (stride 2, the input needs a gradient) and conv1's (one channel, stride 1,
    the images need none)."""
    torch.manual_seed(0)
    conv = fastconv.Conv2d(channels, 24, 9, stride=stride)
    x = torch.randn(4, channels, size, size, requires_grad=input_grad)
    grads = []
    for gemm in (True, False):
        conv.zero_grad()
        x.grad = None
        conv.gemm = gemm
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        o = (size - 9) // stride + 1
        assert y.dtype == torch.bfloat16 and y.shape == (4, 24, o, o)
        assert (type(y.grad_fn).__name__ == "_GemmConvBackward") == gemm  # the path this case is about
        (y.float() ** 2).sum().backward()
        grads.append((y.detach().float(), conv.weight.grad.clone(), conv.bias.grad.clone(),
                       *([x.grad.clone()] if input_grad else [])))
    for ours, ref in zip(*grads):
        assert ours.dtype == torch.float32
        assert ((ours - ref).norm() / ref.norm()) < 2e-2  # bf16 rounding, not a different function


def test_the_output_may_be_changed_in_place():
    """conv1's ReLU runs in place on its output: the output must not be a view of the product's."""
    torch.manual_seed(10)
    w = torch.randn(8, 1, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(2, 1, 9, 9, dtype=torch.bfloat16)
    gy = torch.randn(2, 8, 7, 7, dtype=torch.bfloat16)
    y = fastconv.conv2d(x, w, None, 1).relu_()
    (y * gy).sum().float().backward()
    ref_y = F.conv2d(x.double(), w.detach().double(), stride=1)
    _, ref = _library_grads(x.double(), w.detach().double(), gy.double() * (ref_y > 0), 1)
    assert torch.allclose(y.double(), ref_y.relu(), rtol=2e-2, atol=5e-2)
    assert torch.allclose(w.grad.double(), ref, rtol=2e-2, atol=1e-1)


def test_two_forwards_before_one_backward():
    """The patches kept for the weight gradient live in a shared buffer: a second call before the
    backward pass overwrites them, and the first call's gradient must not use the second's."""
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    x1 = torch.randn(2, 4, 9, 9, dtype=torch.bfloat16, requires_grad=True)
    x2 = torch.randn(2, 4, 9, 9, dtype=torch.bfloat16, requires_grad=True)
    gy1, gy2 = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16), torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    y1 = fastconv.conv2d(x1, w, None, 2)
    y2 = fastconv.conv2d(x2, w, None, 2)
    ((y1 * gy1).sum() + (y2 * gy2).sum()).float().backward()
    _, w1 = _library_grads(x1.detach().double(), w.detach().double(), gy1.double(), 2)
    _, w2 = _library_grads(x2.detach().double(), w.detach().double(), gy2.double(), 2)
    assert torch.allclose(w.grad.double(), w1 + w2, rtol=2e-2, atol=5e-2)


def test_inference_gives_the_training_forward():
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(6, 8, 3, stride=2)
    x = torch.randn(2, 6, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_train = fastconv.conv2d(x, conv.weight, conv.bias, 2)
        with torch.no_grad():
            y_infer = fastconv.conv2d(x, conv.weight, conv.bias, 2)
    assert y_train.requires_grad and not y_infer.requires_grad
    assert torch.equal(y_train.detach(), y_infer)


def test_fp32_path_is_the_library_convolution():
    conv = torch.nn.Conv2d(3, 4, 3, stride=2)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(fastconv.conv2d(x, conv.weight, conv.bias, 2), conv(x))


def test_inference_runs_in_chunks_with_a_training_sized_buffer():
    """Without a gradient the products take INFERENCE_CHUNK images at a time: the same output as one
    product over the whole batch (130 = 64 + 64 + 2 images), and a patch buffer no larger."""
    torch.manual_seed(5)
    w, bias = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    x = torch.randn(130, 4, 9, 9, dtype=torch.bfloat16)
    fastconv._workspace.flat = None
    with torch.no_grad():
        y = fastconv.conv2d(x, w, bias, 2)
    assert fastconv._workspace.flat.numel() == fastconv.INFERENCE_CHUNK * 4 * 4 * 3 * 3 * 4
    ref = F.conv2d(x.double(), w.double(), bias.double(), stride=2)
    assert y.shape == ref.shape and torch.allclose(y.double(), ref, rtol=2e-2, atol=5e-2)
    assert torch.equal(y, fastconv._gemm_forward(x, fastconv._weight_matrix(w), bias, 2))  # one product for all


def test_a_buffer_made_in_inference_mode_serves_training_after():
    torch.manual_seed(6)
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(2, 4, 9, 9, dtype=torch.bfloat16)
    fastconv._workspace.flat = None
    with torch.inference_mode():
        fastconv.conv2d(x, w, None, 2)
    fastconv.conv2d(x, w, None, 2).float().sum().backward()  # "inplace update to inference tensor" before
    _, ref = _library_grads(x.double(), w.detach().double(), torch.ones(2, 8, 4, 4, dtype=torch.float64), 2)
    assert torch.allclose(w.grad.double(), ref, rtol=2e-2, atol=5e-2)


def test_frozen_input_gets_only_the_weight_gradient():
    """As after --freeze-conv1-after: the input needs no gradient, the weights and bias do."""
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(16, 24, 9, stride=2)
    x = torch.randn(4, 16, 20, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastconv.conv2d(x, conv.weight, conv.bias, 2)
    gy = torch.randn(4, 24, 6, 6)
    (y.float() * gy).sum().backward()
    ref_w = _library_grads(x.double(), conv.weight.detach().double(), gy.double(), 2)[1]
    assert ((conv.weight.grad.double() - ref_w).norm() / ref_w.norm()) < 1e-2
    ref_b = gy.double().sum(dim=(0, 2, 3))
    assert ((conv.bias.grad.double() - ref_b).norm() / ref_b.norm()) < 1e-2  # gy and the sum in bf16


def _in_thread(fn):
    """fn() run on a new thread; its result (or its exception, raised here)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_backward_on_another_thread_gathers_the_patches_anew():
    """Each thread has its own patch buffer. A backward pass run on a thread whose buffer holds
    patches of the same shape (another input's) must not take them for its forward's."""
    torch.manual_seed(8)
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    x1, x2 = torch.randn(2, 2, 4, 9, 9, dtype=torch.bfloat16).unbind(0)
    gy = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    y1 = _in_thread(lambda: fastconv.conv2d(x1, w, None, 2))  # first write in a fresh thread

    def other_thread():
        fastconv.conv2d(x2, w, None, 2)  # its first write: the same shape, x2's patches
        (y1 * gy).sum().float().backward()  # runs on this thread

    _in_thread(other_thread)
    _, ref = _library_grads(x1.double(), w.detach().double(), gy.double(), 2)
    assert torch.allclose(w.grad.double(), ref, rtol=2e-2, atol=5e-2)


def test_threads_running_the_layer_at_once_get_their_own_outputs():
    torch.manual_seed(9)
    w = torch.randn(32, 16, 5, 5, dtype=torch.bfloat16)
    xs = [torch.randn(64, 16, 20, 20, dtype=torch.bfloat16) for _ in range(2)]
    with torch.no_grad():
        refs = [fastconv.conv2d(x, w, None, 2) for x in xs]
    start = threading.Barrier(2)
    mismatches = [0, 0]

    def work(i):
        start.wait()
        with torch.no_grad():
            for _ in range(40):
                mismatches[i] += not torch.equal(fastconv.conv2d(xs[i], w, None, 2), refs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == [0, 0]
