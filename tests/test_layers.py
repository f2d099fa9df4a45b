import torch

from capsnet.layers import DigitCaps, PrimaryCaps
from capsnet.routing import squash


def test_squash_keeps_direction_and_shrinks_below_one():
    s = torch.randn(1000, 16) * torch.logspace(-3, 2, 1000)[:, None]
    v = squash(s)
    n_s, n_v = s.norm(dim=-1), v.norm(dim=-1)
    assert (n_v < 1).all()
    cos = (s * v).sum(-1) / (n_s * n_v)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    # |v| = |s|^2 / (1 + |s|^2) away from zero (Eq. 1)
    expected = n_s**2 / (1 + n_s**2)
    big = n_s > 0.1  # below that the epsilon under the root shows
    assert torch.allclose(n_v[big], expected[big], rtol=1e-4)
    assert (squash(torch.full((1, 16), 1e6)).norm() <= 1).all()  # huge inputs round to 1, never past it


def test_squash_of_zero_has_finite_value_and_gradient():
    s = torch.zeros(3, 8, requires_grad=True)
    v = squash(s)
    v.sum().backward()
    assert torch.isfinite(v).all() and (v == 0).all()
    assert torch.isfinite(s.grad).all()


def test_primary_caps_shape_and_order():
    layer = PrimaryCaps(in_channels=5, types=3, dim=4, kernel=3, stride=2)
    x = torch.randn(2, 5, 9, 9)
    u = layer(x)
    assert u.shape == (2, 3 * 4 * 4, 4)
    # capsule i = (type, row, col): type 1 at row 2, col 3 is made of channels 4..7 at (2, 3)
    raw = layer.conv(x)[0, 4:8, 2, 3]
    assert torch.allclose(u[0, 1 * 16 + 2 * 4 + 3], squash(raw), atol=1e-6)


def test_digit_caps_predictions_match_a_loop():
    for shared in (False, True):
        layer = DigitCaps(in_caps=12, in_dim=8, out_caps=3, out_dim=5, routing_iters=2, types=3, shared=shared)
        u = torch.randn(2, 12, 8)
        u_hat = layer.predictions(u)
        assert u_hat.shape == (2, 3, 12, 5)
        w = layer.weight.view(layer.weight.shape[0], 8, 3, 5)
        for i in range(12):
            row = i // 4 if shared else i  # capsule i belongs to type i // (12 / 3)
            for j in range(3):
                want = u[:, i] @ w[row, :, j]
                assert torch.allclose(u_hat[:, j, i], want, atol=1e-5)
        assert layer.weight.shape[0] == (3 if shared else 12)


def test_weights_start_uniform_within_range():
    layer = DigitCaps(in_caps=1152, in_dim=8, out_caps=10, out_dim=16, routing_iters=3, types=32, init_range=0.05)
    w = layer.weight
    assert w.abs().max() <= 0.05 and w.abs().max() > 0.049
    assert abs(w.mean().item()) < 1e-3
