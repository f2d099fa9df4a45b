import torch

from capsnet.routing import coupling_coefficients, dynamic_routing, squash


def slow_routing(u_hat, iterations, bias=None):
    """Procedure 1 of the paper with explicit loops, u_hat indexed [b, i, j, d] as printed
    (bias: [j, d] added to each s_j before its squash, or None as in the paper)."""
    b, i_n, j_n, _ = u_hat.shape
    out = []
    for n in range(b):
        logits = torch.zeros(i_n, j_n, dtype=u_hat.dtype)
        for r in range(iterations):
            c = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)  # softmax over j, for each i
            v = []
            for j in range(j_n):
                s = sum(c[i, j] * u_hat[n, i, j] for i in range(i_n))
                if bias is not None:
                    s = s + bias[j]
                v.append(squash(s))
            v = torch.stack(v)
            if r < iterations - 1:
                for i in range(i_n):
                    for j in range(j_n):
                        logits[i, j] = logits[i, j] + u_hat[n, i, j] @ v[j]
        out.append(v)
    return torch.stack(out)


def test_routing_matches_the_papers_procedure():
    u = torch.randn(2, 7, 4, 3, dtype=torch.float64)  # [b, i, j, d]
    for iters in (1, 2, 3):
        fast = dynamic_routing(u.permute(0, 2, 1, 3).contiguous(), iters)
        assert torch.allclose(fast, slow_routing(u, iters), atol=1e-10)


def test_couplings_sum_to_one_over_parents():
    u_hat = torch.randn(3, 10, 50, 16)  # [b, j, i, d]
    c = coupling_coefficients(u_hat, 3)  # [b, j, i]
    assert torch.allclose(c.sum(dim=1), torch.ones(3, 50), atol=1e-6)  # over output capsules j
    assert not torch.allclose(c.sum(dim=2), torch.ones(3, 10))  # not over inputs: that is the common bug
    assert not torch.allclose(c, torch.full_like(c, 0.1))  # routing moved them off uniform


def test_one_iteration_is_uniform_coupling():
    u_hat = torch.randn(2, 4, 9, 5)
    v = dynamic_routing(u_hat, 1)
    assert torch.allclose(v, squash(u_hat.sum(dim=2) / 4), atol=1e-6)  # c_ij = 1/4 for all 4 parents


def test_detached_routing_changes_only_the_gradient():
    u_hat = torch.randn(2, 4, 9, 5, requires_grad=True)
    v_full = dynamic_routing(u_hat, 3)
    v_det = dynamic_routing(u_hat, 3, detach_inner=True)
    assert torch.allclose(v_full, v_det)
    g_full, = torch.autograd.grad(v_full.pow(2).sum(), u_hat)
    g_det, = torch.autograd.grad(v_det.pow(2).sum(), u_hat)
    assert torch.isfinite(g_full).all() and torch.isfinite(g_det).all()
    assert not torch.allclose(g_full, g_det)


def test_bias_is_added_before_every_squash():
    u = torch.randn(2, 7, 4, 3, dtype=torch.float64)  # [b, i, j, d]
    bias = torch.randn(4, 3, dtype=torch.float64)
    for iters in (1, 2, 3):
        fast = dynamic_routing(u.permute(0, 2, 1, 3).contiguous(), iters, bias=bias)
        assert torch.allclose(fast, slow_routing(u, iters, bias), atol=1e-10)
        assert not torch.allclose(fast, slow_routing(u, iters))  # the bias changed the capsules


def test_bias_gradient_is_exact():
    u_hat = torch.randn(2, 4, 9, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, b: dynamic_routing(u, 3, bias=b), (u_hat, bias))
