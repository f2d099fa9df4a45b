"""Shared by the probes in tools/: CPU training steps of the MNIST model on one synthetic batch,
set up as `capsnet bench` sets them up (the shifts, the loss, fused Adam, torch.compile per layer)."""
from __future__ import annotations

from typing import Callable

import torch

from capsnet.config import ModelConfig, TrainConfig
from capsnet.data.augment import augment
from capsnet.model import CapsNet
from capsnet.runtime import configure, resolve_precision
from capsnet.train import compile_model, make_optimizer, step, to_input


def training_step(*, batch: int = 64, fp32_routing: bool = False
                  ) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None], str]:
    """(next_batch: the batch freshly shifted, train: one training step on it, the precision)."""
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    configure(device, precision)
    torch.manual_seed(0)
    model = CapsNet(ModelConfig(fp32_routing=fp32_routing))
    compile_model(model, "layer")
    cfg = TrainConfig(batch_size=batch)
    optimizer = make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    model.train()

    def next_batch() -> torch.Tensor:
        return augment(to_input(images, device), cfg, gen)

    def train(x: torch.Tensor) -> None:
        step(model, x, labels, cfg, precision, optimizer)

    return next_batch, train, precision
