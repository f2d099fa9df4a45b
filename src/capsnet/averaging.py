"""An exponential moving average of a model's weights, kept beside the model being trained.

After every optimizer step the average moves a little toward the live weights:
avg <- decay * avg + (1 - decay) * w. Evaluated in place of the live weights, it smooths out
the last steps' noise, which matters most when a run is too short to anneal the learning rate
all the way down. Early on the decay is capped at (1 + n) / (10 + n) after n updates, so the
average doesn't keep the random initial weights for a thousand steps.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    def __init__(self, source: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(source).eval().requires_grad_(False)  # what evaluation and model.pt use
        self._live = [t for t in source.state_dict().values() if t.is_floating_point()]
        self._avg = [t for t in self.model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._avg, self._live, 1.0 - decay)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
