"""CapsNet: conv1 -> PrimaryCaps -> DigitCaps (routing) -> lengths, and a masked decoder."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import fastconv
from .config import ModelConfig
from .layers import DigitCaps, PrimaryCaps


class CapsNetOutput(NamedTuple):
    lengths: torch.Tensor  # [b, j] |v_j|: the probability that class j is present
    poses: torch.Tensor  # [b, j, d] the digit capsules v_j
    recon: torch.Tensor | None  # [b, c, h, w] decoder output ([b, m, c, h, w] for labels [b, m]), or None without a decoder


class Decoder(nn.Module):
    """Three fully connected layers from the masked digit capsules to the image (Fig. 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sizes = (cfg.num_classes * cfg.digit_dim, *cfg.decoder_hidden)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        layers += [nn.Linear(sizes[-1], cfg.image_pixels), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)

    def forward(self, poses: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """poses: [b, j, d]; select: [b] class whose capsule is kept, the others zeroed."""
        mask = F.one_hot(select, poses.shape[1]).to(poses.dtype)  # [b, j]
        flat = (poses * mask.unsqueeze(-1)).flatten(1)  # [b, j*d]
        return self.net(flat).view(-1, *self.shape)


def _normal_cut_at_two_std(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


@torch.no_grad()
def authors_init(model: "CapsNet") -> None:
    """The starting weights of the authors' published code: every weight drawn from a normal cut at
    two standard deviations (std 0.05 for conv1, 0.1 for the PrimaryCaps convolution, the
    transformation matrices and the decoder), every bias 0.1 (the capsule bias included).

    On MNIST the default start (PyTorch's layer defaults, matrices uniform in +-0.05) makes the
    primary capsules about 0.1 long and the digit capsules about 0.002; this one about 0.97 and
    0.8 (tests/test_model.py holds the order of magnitude).
    """
    decoder = [m for m in model.decoder.net if isinstance(m, nn.Linear)] if model.decoder is not None else []
    _normal_cut_at_two_std(model.conv1.weight, 0.05)
    for weight in (model.primary.conv.weight, model.digits.weight, *(m.weight for m in decoder)):
        _normal_cut_at_two_std(weight, 0.1)
    for bias in (model.conv1.bias, model.primary.conv.bias, model.digits.bias, *(m.bias for m in decoder)):
        if bias is not None:  # (the capsule bias is optional)
            bias.fill_(0.1)


class CapsNet(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        self.conv1 = fastconv.Conv2d(cfg.in_channels, cfg.conv_channels, cfg.conv_kernel)  # GEMMs on CPU in bf16
        self.primary = PrimaryCaps(in_channels=cfg.conv_channels, types=cfg.primary_types, dim=cfg.primary_dim,
                                   kernel=cfg.primary_kernel, stride=cfg.primary_stride)
        self.digits = DigitCaps(in_caps=cfg.num_primary, in_dim=cfg.primary_dim, out_caps=cfg.num_classes,
                                out_dim=cfg.digit_dim, routing_iters=cfg.routing_iters, types=cfg.primary_types,
                                shared=cfg.shared_weights, detach_routing=cfg.detach_routing,
                                init_range=cfg.weight_init, bias=cfg.capsule_bias)
        self.decoder = Decoder(cfg) if cfg.reconstruct else None
        if cfg.init == "authors":
            authors_init(self)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[b, c, h, w] -> primary capsules [b, i, 8]."""
        h = self.conv1(images)  # [b, 256, 20, 20]
        # In place: conv1's output is not needed for its own backward, and a fresh 13M-value
        # tensor per batch costs more (new pages) than the ReLU itself (measured: 30 ms vs 13 ms).
        h = F.leaky_relu(h, self.cfg.leaky_slope, inplace=True) if self.cfg.leaky_relu else F.relu(h, inplace=True)
        return self.primary(h)

    def route(self, primary: torch.Tensor) -> torch.Tensor:
        """[b, i, 8] -> digit capsules [b, j, 16], in float32 whatever the autocast.

        Under bf16 autocast the predictions u_hat = W u are bf16 (about 3 significant digits)
        unless cfg.fp32_routing, which computes them, and routes them, in float32.
        """
        if self.cfg.fp32_routing:
            with torch.autocast(primary.device.type, enabled=False):
                return self.digits(primary.float())
        return self.digits(primary).float()

    def reconstruct(self, poses: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise RuntimeError("this model was built without a decoder (reconstruct=False)")
        return self.decoder(poses, select).float()

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                reconstruct: bool = True) -> CapsNetOutput:
        """Classify, and reconstruct through one capsule per image.

        During training pass the true labels: the decoder then learns from the capsule of
        the right class only (section 4.1), so it can't be helped by a wrong winner. At
        evaluation (labels=None) it reconstructs through the longest capsule. labels [b, m]
        (multimnist: m digits per image) reconstruct once per label, recon [b, m, c, h, w].
        reconstruct=False skips the decoder (recon is None): classification alone.
        """
        poses = self.route(self.encode(images))
        lengths = poses.norm(dim=-1)  # [b, j]
        recon = None
        if self.decoder is not None and reconstruct:
            if labels is not None and labels.dim() == 2:  # several objects per image: [b, m, c, h, w]
                recon = torch.stack([self.reconstruct(poses, labels[:, m]) for m in range(labels.shape[1])], dim=1)
            else:
                recon = self.reconstruct(poses, labels if labels is not None else lengths.argmax(dim=1))
        return CapsNetOutput(lengths, poses, recon)
