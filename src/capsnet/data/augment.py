"""Training augmentation, drawn independently for each image, on whatever device the images are:
whole-pixel shifts (the paper's), or small random affine warps (rotation, scale, shift), and
optionally elastic distortions and a blanked-out square (neither in the paper)."""
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


def gaussian_matrix(size: int, sigma: float, device=None) -> torch.Tensor:
    """[size, size]: row i holds a normalised Gaussian (sd sigma pixels, cut at 4 sd) centred on i, so
    G @ x blurs x along its first axis with zero padding (the part of the kernel past an edge is lost)."""
    radius = max(1, math.ceil(4 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    total = torch.exp(-0.5 * (offsets / sigma) ** 2).sum()  # the whole kernel's weight
    distance = (torch.arange(size, device=device)[None, :] - torch.arange(size, device=device)[:, None]).float()
    weights = torch.exp(-0.5 * (distance / sigma) ** 2) * (distance.abs() <= radius)  # [size, size]
    return weights / total


def elastic_warp(images: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Each output pixel p reads the input at p + displacement[:, :, p] (dx right, dy down, in pixels);
    bilinear, zero fill.

    images: [b, c, h, w]; displacement: [b, 2, h, w] -> [b, c, h, w].
    """
    b, c, h, w = images.shape
    identity = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(b, 2, 3)
    grid = F.affine_grid(identity, [b, c, h, w], align_corners=False)  # [b, h, w, 2]: (x, y) in [-1, 1]
    per_pixel = images.new_tensor([2 / w, 2 / h])  # one pixel in grid units
    grid = grid + displacement.permute(0, 2, 3, 1).to(images.dtype) * per_pixel
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_elastic(images: torch.Tensor, alpha: float, sigma: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Elastic distortion (Simard, Steinkraus and Platt, 2003): a displacement field of independent
    uniform values in [-1, 1] per pixel, blurred by a Gaussian of sd sigma pixels and scaled by alpha,
    drawn for each image. Their values for MNIST, alpha 34 and sigma 4, move pixels by about 1.4 px (sd).

    images: [b, c, h, w] -> [b, c, h, w].
    """
    if alpha <= 0:
        return images
    b, _, h, w = images.shape
    noise = torch.rand(b, 2, h, w, generator=generator, device=images.device) * 2 - 1  # [b, 2, h, w]
    rows, cols = gaussian_matrix(h, sigma, images.device), gaussian_matrix(w, sigma, images.device)
    field = torch.einsum("ij,bdjk,lk->bdil", rows, noise, cols) * alpha  # [b, 2, h, w], smooth
    return elastic_warp(images, field)


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
    it sets a rotation or scale range, then random_affine; then an elastic distortion and a blanked
    square if it sets them (each draws from the generator only when it is on)."""
    if cfg.max_rotation > 0 or cfg.max_scale > 0:
        images = random_affine(images, cfg.max_shift, cfg.max_rotation, cfg.max_scale, generator)
    else:
        images = random_shift(images, cfg.max_shift, generator)
    images = random_elastic(images, cfg.elastic, cfg.elastic_sigma, generator)
    return random_erase(images, cfg.erase, generator)
