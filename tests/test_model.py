import pytest
import torch

from capsnet import CapsNet, ModelConfig
from capsnet.losses import capsule_loss, margin_loss, reconstruction_loss


def test_paper_sizes_on_mnist():
    cfg = ModelConfig()
    assert cfg.num_primary == 1152
    model = CapsNet(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == 8.2  # the paper: 8.2M with the decoder ...
    no_dec = sum(p.numel() for p in CapsNet(ModelConfig(reconstruct=False)).parameters())
    assert round(no_dec / 1e6, 1) == 6.8  # ... and 6.8M without it


@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (3, 32, 7)])
def test_shapes_through_every_stage(channels, size, classes):
    cfg = ModelConfig(in_channels=channels, image_size=size, num_classes=classes, conv_channels=32, primary_types=4)
    model = CapsNet(cfg)
    x = torch.rand(2, channels, size, size)
    h = model.encode(x)
    grid = ((size - 8) - 9) // 2 + 1
    assert cfg.primary_grid == grid and h.shape == (2, 4 * grid * grid, 8)
    v = model.route(h)
    assert v.shape == (2, classes, 16)
    out = model(x, torch.tensor([0, 1]))
    assert out.lengths.shape == (2, classes) and out.recon.shape == (2, channels, size, size)
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="too small"):
        ModelConfig(image_size=16)


def test_decoder_masks_by_label_in_training_and_by_length_in_evaluation():
    torch.manual_seed(0)
    model = CapsNet(ModelConfig(conv_channels=16, primary_types=4))
    with torch.no_grad():  # an untrained decoder barely depends on its input: make it sensitive
        model.decoder.net[0].weight.mul_(1000)
    x = torch.rand(4, 1, 28, 28)
    poses = model.route(model.encode(x))
    winners = poses.norm(dim=-1).argmax(dim=1)
    labels = (winners + 1) % 10  # deliberately not the winners
    by_label = model(x, labels).recon
    by_length = model(x).recon
    assert torch.allclose(by_label, model.reconstruct(poses, labels), atol=1e-6)
    assert torch.allclose(by_length, model.reconstruct(poses, winners), atol=1e-6)
    assert not torch.allclose(by_label, by_length)
    # the mask really zeroes the other capsules: changing them leaves the reconstruction alone
    other = poses.clone()
    other[torch.arange(4), (labels + 1) % 10] += 1.0
    assert torch.allclose(model.reconstruct(other, labels), by_label, atol=1e-6)


def test_margin_loss_matches_a_hand_computed_value():
    lengths = torch.tensor([[0.95, 0.3, 0.05], [0.2, 0.8, 0.6]])
    labels = torch.tensor([0, 2])
    # image 1: present 0.95 >= 0.9 -> 0; absent 0.3 -> 0.5*0.2^2 = 0.02; absent 0.05 -> 0
    # image 2: absent 0.2 -> 0.5*0.1^2 = 0.005; absent 0.8 -> 0.5*0.7^2 = 0.245; present 0.6 -> 0.3^2 = 0.09
    expected = (0.02 + (0.005 + 0.245 + 0.09)) / 2
    assert margin_loss(lengths, labels).item() == pytest.approx(expected, abs=1e-7)


def test_reconstruction_loss_is_per_image_sum_averaged_over_batch():
    recon = torch.zeros(2, 1, 2, 2)
    images = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 0.5]]]])
    assert reconstruction_loss(recon, images).item() == pytest.approx((1 + 3.25) / 2)
    total, margin, rec = capsule_loss(torch.full((2, 3), 0.5), torch.tensor([0, 1]), recon, images)
    assert total.item() == pytest.approx(margin.item() + 0.0005 * rec.item())


def test_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    for cfg in (ModelConfig(conv_channels=16, primary_types=4),
                ModelConfig(conv_channels=16, primary_types=4, shared_weights=True, leaky_relu=True),
                ModelConfig(conv_channels=16, primary_types=4, capsule_bias=True)):
        model = CapsNet(cfg)
        x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
        out = model(x, y)
        loss, _, _ = capsule_loss(out.lengths, y, out.recon, x)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_bf16_autocast_agrees_with_fp32():
    torch.manual_seed(0)
    model = CapsNet(ModelConfig(conv_channels=32, primary_types=8)).eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x).lengths
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).lengths
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.02


def test_capsule_bias_starts_at_0_1_and_at_zero_is_the_papers_model():
    from capsnet.config import from_dict, to_dict

    torch.manual_seed(0)
    cfg = ModelConfig(conv_channels=16, primary_types=4)
    plain = CapsNet(cfg).eval()
    biased = CapsNet(ModelConfig(conv_channels=16, primary_types=4, capsule_bias=True)).eval()
    assert "digits.bias" not in plain.state_dict()
    missing, unexpected = biased.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["digits.bias"] and unexpected == []
    assert torch.equal(biased.digits.bias, torch.full((10, 16), 0.1))  # the authors' code's start
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(biased(x).poses, plain(x).poses, atol=1e-3)
        biased.digits.bias.zero_()
        assert torch.allclose(biased(x).poses, plain(x).poses, atol=1e-6)  # zero bias: the same capsules
    # a model saved before the switch existed has no capsule_bias key: it builds without a bias
    saved = to_dict(cfg)
    saved.pop("capsule_bias")
    assert from_dict(ModelConfig, saved).capsule_bias is False


def test_the_authors_start_is_their_normals_and_biases_and_gives_long_capsules(mnist):
    torch.manual_seed(0)
    default = CapsNet(ModelConfig())
    torch.manual_seed(0)
    authors = CapsNet(ModelConfig(init="authors", capsule_bias=True))
    for name, std in (("conv1.weight", 0.05), ("primary.conv.weight", 0.1), ("digits.weight", 0.1),
                      ("decoder.net.4.weight", 0.1)):
        w = authors.get_parameter(name)
        assert w.abs().max() <= 2 * std  # cut at two standard deviations
        assert 0.85 * std < w.std() < 0.9 * std, name  # a normal cut at 2 std keeps 0.88 of its std
    for name, p in authors.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.full_like(p, 0.1)), name
    x = mnist.train_images[:32].float().div(255)
    with torch.no_grad():
        assert default(x).lengths.mean() < 0.01 < 0.5 < authors(x).lengths.mean()


@pytest.mark.parametrize("use_kernel", [True, False])
def test_fp32_routing_keeps_the_predictions_and_the_routing_in_float32_under_bf16(use_kernel):
    from dataclasses import replace

    torch.manual_seed(0)
    cfg = ModelConfig(conv_channels=16, primary_types=4)
    paper, fp32 = CapsNet(cfg), CapsNet(replace(cfg, fp32_routing=True))
    fp32.load_state_dict(paper.state_dict())
    paper.digits.use_kernel = fp32.digits.use_kernel = use_kernel
    primary = (torch.rand(4, cfg.num_primary, 8) - 0.5).bfloat16()  # [b, i, 8] as bf16 autocast leaves them
    with torch.no_grad():
        exact = paper.route(primary.float())  # [b, j, 16] everything in float32, no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded, kept = paper.route(primary), fp32.route(primary)
    scale = exact.abs().max()
    assert (rounded - exact).abs().max() > 1e-4 * scale  # bf16 u_hat: about three significant digits
    assert (kept - exact).abs().max() < 1e-6 * scale
