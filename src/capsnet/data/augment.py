"""Training augmentation, drawn independently for each image, on whatever device the images are:
whole-pixel shifts (the paper's), or small random affine warps (rotation, scale, shift), and
optionally a blanked-out square (not in the paper)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by its own (dy, dx), each uniform in [-max_shift, max_shift]; zero fill.

    images: [b, c, h, w] -> [b, c, h, w]. The shifts are drawn from `generator` (which must
    live on the images' device) so that a run is reproducible.
    """
    if max_shift <= 0:
        return images
    b, c, h, w = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p))  # [b, c, h + 2p, w + 2p]
    offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=images.device)  # top-left corners
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # [b, h]
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # [b, w]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def affine_warp(images: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image by angle[i] (radians, counter-clockwise as displayed), scale it by scale[i]
    about its centre, then move it by shift[i] = (dx, dy) pixels (right, down); bilinear, zero fill.

    images: [b, c, h, w]; angle, scale: [b]; shift: [b, 2] -> [b, c, h, w]. With angle 0, scale 1 and
    whole-pixel shifts this is exactly random_shift's copy.
    """
    b, c, h, w = images.shape
    # affine_grid asks, for every output pixel p (in [-1, 1] coordinates), where to read the input:
    # in pixels that is M (p - shift) with M = R(angle)^-1 / scale; D converts pixels <-> [-1, 1].
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    m = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [b, 2, 2]
    half = images.new_tensor([w / 2, h / 2])  # D = diag(w/2, h/2)
    linear = m * half[None, None, :] / half[None, :, None]  # D^-1 M D
    offset = -(m @ shift.to(images.dtype)[:, :, None])[:, :, 0] / half  # -D^-1 M shift
    theta = torch.cat([linear, offset[:, :, None]], dim=2).to(images.dtype)  # [b, 2, 3]
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(images: torch.Tensor, max_shift: float, max_rotation: float, max_scale: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image its own rotation (uniform in +-max_rotation degrees), scale (uniform in 1 +- max_scale)
    and shift (dx, dy each uniform in +-max_shift pixels, not rounded): affine_warp with drawn values."""
    b = images.shape[0]
    u = torch.rand(4, b, generator=generator, device=images.device) * 2 - 1  # [4, b], uniform in [-1, 1)
    return affine_warp(images, u[0] * math.radians(max_rotation), 1 + u[1] * max_scale,
                       torch.stack([u[2], u[3]], dim=1) * max_shift)


def random_erase(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Set a size x size square of each image to zero, its centre pixel uniform over the whole image
    (so near an edge only part of the square falls inside): "cutout" (DeVries and Taylor, 2017).

    images: [b, c, h, w] -> [b, c, h, w]; the centres are drawn from `generator`.
    """
    if size <= 0:
        return images
    b, c, h, w = images.shape
    centres = torch.rand(2, b, generator=generator, device=images.device)  # [2, b], uniform in [0, 1)
    top = (centres[0] * h).long() - size // 2  # [b], may be negative: the square is clipped
    left = (centres[1] * w).long() - size // 2
    rows = torch.arange(h, device=images.device)[None, :] - top[:, None]  # [b, h]
    cols = torch.arange(w, device=images.device)[None, :] - left[:, None]  # [b, w]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]  # [b, h, w]
    return images.masked_fill(inside[:, None], 0.0)


def augment(images: torch.Tensor, cfg, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training augmentation a TrainConfig asks for: whole-pixel shifts alone (the paper's) unless
    it sets a rotation or scale range, then random_affine; then a blanked square if it sets one."""
    if cfg.max_rotation > 0 or cfg.max_scale > 0:
        images = random_affine(images, cfg.max_shift, cfg.max_rotation, cfg.max_scale, generator)
    else:
        images = random_shift(images, cfg.max_shift, generator)
    return random_erase(images, cfg.erase, generator)
