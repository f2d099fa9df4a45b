"""Random translations, one independent shift per image, on whatever device the images are."""
from __future__ import annotations

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
