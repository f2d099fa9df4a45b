"""Margin loss (Eq. 4) and the reconstruction regulariser (section 4.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_loss(lengths: torch.Tensor, labels: torch.Tensor, *, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_absent: float = 0.5) -> torch.Tensor:
    """Eq. 4, summed over classes and averaged over the batch.

    lengths: [b, j] capsule lengths in [0, 1); labels: [b] class indices, or [b, m] for images
    that show m objects (multimnist), every one of them present.
    L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2
    """
    present = F.one_hot(labels, lengths.shape[1])  # [b, j] or [b, m, j]
    if present.dim() == 3:
        present = present.amax(dim=1)
    present = present.to(lengths.dtype)  # T_k
    loss = present * F.relu(m_plus - lengths) ** 2 + lambda_absent * (1 - present) * F.relu(lengths - m_minus) ** 2
    return loss.sum(dim=1).mean()


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, averaged over the batch (scaled by the caller).

    recon and images: [b, c, h, w], or [b, m, c, h, w] (one reconstruction per object, each
    against that object alone; their errors add up)."""
    return (recon.float() - images.float()).pow(2).flatten(1).sum(dim=1).mean()


def capsule_loss(lengths, labels, recon, images, *, m_plus=0.9, m_minus=0.1, lambda_absent=0.5,
                 recon_weight=0.0005):
    """Total loss: margin + recon_weight * reconstruction. Returns (total, margin, recon)."""
    margin = margin_loss(lengths.float(), labels, m_plus=m_plus, m_minus=m_minus, lambda_absent=lambda_absent)
    if recon is None:
        return margin, margin, margin.new_zeros(())
    rec = reconstruction_loss(recon, images)
    return margin + recon_weight * rec, margin, rec
