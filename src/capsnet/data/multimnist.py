"""MultiMNIST (Sabour et al. 2017, section 6): two MNIST digits of different classes, each shifted by
up to 4 pixels in each direction, overlaid on one 36x36 image.

Nothing is downloaded beyond MNIST. The training loop pairs the training digits afresh every epoch
(`overlay`, from the run's seed, shifting each digit by up to --shift px: 4 unless told); the
validation and test pairs are drawn once from fixed seeds (`fixed_pairs`), so every run and every
`capsnet evaluate` sees the same images. Where the two
digits overlap their intensities add, capped at 255 (our choice: the paper says "overlaying").
The test set pairs each of MNIST's 10,000 test digits with one partner (the paper drew 1,000 per
digit: 10M images); the training digits' partners come from the training digits alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CapsNetError
from . import mnist
from .augment import random_shift

BASE = "mnist"  # the data set the pairs are made from
CLASSES = mnist.CLASSES
DIGITS = 2  # digits per image
MAX_SHIFT = 4  # pixels, each direction, each digit
SIZE = 28 + 2 * MAX_SHIFT  # 36
TEST_SEED, VAL_SEED = 2017, 2018  # the fixed pairs' random streams


def fetch(data_dir, log=print) -> dict[str, bytes]:
    """MultiMNIST is made from MNIST's files: fetch (and verify) those."""
    return mnist.fetch(data_dir, log)


def check_classes(labels: torch.Tensor, what: str = "digits") -> None:
    """Refuse digits that can't be paired: all of one class (a small --limit or --val, say)."""
    if labels.numel() and bool((labels == labels[0]).all()):
        raise CapsNetError(f"multimnist pairs digits of different classes, and the {labels.numel()} {what} "
                           f"are all {int(labels[0])}s (a larger --limit or --val would hold others)")


def partners(pool_labels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
             num_classes: int = len(CLASSES)) -> torch.Tensor:
    """For each of `labels` [b], the index of a random digit in the pool ([n] labels) of another class: [b].

    Uniform over the pool's digits of other classes, so each class turns up as often as it does
    there. With the pool sorted by class, a digit's own class is one block of it: draw a place among
    the other n - count[y] and step over that block. Nothing waits for the device (no redraw loop).
    The pool must hold two classes or more (check_classes).
    """
    n = pool_labels.shape[0]
    by_class = torch.argsort(pool_labels, stable=True)  # [n]
    counts = F.one_hot(pool_labels, num_classes).sum(dim=0)  # [k]
    starts = counts.cumsum(0) - counts  # [k] where each class's block begins
    u = torch.rand(labels.shape, generator=generator, device=labels.device)
    place = (u * (n - counts[labels])).long().clamp_(max=n - 1)  # [b] among the other classes' digits
    place += (place >= starts[labels]) * counts[labels]  # step over the own class's block
    return by_class[place]


def place(digits: torch.Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """[b, c, 28, 28] -> [b, c, 36, 36]: each digit at its own random offset from the centre, up to
    max_shift (at most 4) px each way."""
    if not 0 <= max_shift <= MAX_SHIFT:
        raise CapsNetError(f"multimnist's {SIZE}x{SIZE} images leave room for shifts of 0 to {MAX_SHIFT} px, "
                           f"not {max_shift}")
    centred = F.pad(digits, (MAX_SHIFT,) * 4)  # [b, c, 36, 36]
    return random_shift(centred, max_shift, generator)  # the 4-px border leaves every digit whole


def overlay(first: torch.Tensor, second: torch.Tensor, generator: torch.Generator,
            max_shift: int = MAX_SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint8 digit batches [b, c, 28, 28] -> (images [b, c, 36, 36], parts [b, 2, c, 36, 36]), uint8.

    parts holds each digit as placed, alone: what the decoder learns to reconstruct from its capsule.
    """
    parts = torch.stack([place(first, generator, max_shift), place(second, generator, max_shift)],
                        dim=1)  # [b, 2, c, 36, 36]
    images = parts.sum(dim=1, dtype=torch.int16).clamp_(max=255).to(torch.uint8)
    return images, parts


def fixed_pairs(images: torch.Tensor, labels: torch.Tensor, seed: int,
                what: str = "digits") -> tuple[torch.Tensor, torch.Tensor]:
    """Each digit [n, c, 28, 28] with one partner from the same set, drawn from `seed`:
    (images [n, c, 36, 36] uint8, labels [n, 2]: its own class first)."""
    check_classes(labels, what)
    g = torch.Generator(device=images.device).manual_seed(seed)
    other = partners(labels, labels, g)
    pairs, _ = overlay(images, images[other], g)
    return pairs, torch.stack([labels, labels[other]], dim=1)


def derive(base):
    """The MultiMNIST data set from MNIST: the training digits stay single (the loop pairs them),
    the test digits are paired once (fixed_pairs, TEST_SEED)."""
    from . import Dataset

    test_images, test_labels = fixed_pairs(base.test_images, base.test_labels, TEST_SEED, "test digits")
    return Dataset("multimnist", base.train_images, base.train_labels, test_images, test_labels,
                   base.num_classes, digits=DIGITS)
