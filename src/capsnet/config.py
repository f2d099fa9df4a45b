"""Configuration: one frozen dataclass for the architecture, one for training.

Sizes that follow from others (the number of primary capsules, for instance) are
computed properties, never settings, so a config can't disagree with itself.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The paper's architecture (Sabour et al. 2017, section 4), sized from the data."""

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    conv_channels: int = 256  # conv1: 256 filters, 9x9, stride 1
    conv_kernel: int = 9
    leaky_relu: bool = False  # the Chainer port's variant: slope 0.05 after conv1
    leaky_slope: float = 0.05
    primary_types: int = 32  # PrimaryCaps: 32 types of 8D capsules, 9x9, stride 2
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    digit_dim: int = 16  # DigitCaps: one 16D capsule per class
    routing_iters: int = 3
    shared_weights: bool = False  # one matrix per capsule type instead of per capsule
    detach_routing: bool = False  # stop gradients through u_hat in the inner iterations
    fp32_routing: bool = False  # u_hat and the routing in float32 even under bf16 autocast (the convolutions stay bf16)
    capsule_bias: bool = False  # a learned bias (from 0.1) added to each s_j before the squash (the authors' code)
    weight_init: float = 0.05  # init "default": transformation matrices drawn uniform in +-weight_init
    init: str = "default"  # default: PyTorch's layer defaults | authors: the authors' code's (see model.py)
    reconstruct: bool = True
    decoder_hidden: tuple[int, ...] = (512, 1024)

    def __post_init__(self) -> None:
        if self.primary_grid < 1:
            raise ValueError(
                f"image size {self.image_size} is too small for conv kernels "
                f"{self.conv_kernel} and {self.primary_kernel}"
            )
        if self.routing_iters < 1:
            raise ValueError("routing_iters must be at least 1")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")

    @property
    def conv_out(self) -> int:
        return self.image_size - self.conv_kernel + 1  # 28 -> 20

    @property
    def primary_grid(self) -> int:
        return (self.conv_out - self.primary_kernel) // self.primary_stride + 1  # 20 -> 6

    @property
    def num_primary(self) -> int:
        return self.primary_types * self.primary_grid**2  # 32 * 6 * 6 = 1152

    @property
    def image_pixels(self) -> int:
        return self.in_channels * self.image_size**2


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training recipe: these defaults are the "default" recipe (see RECIPES for the others).

    The loss, the shifts and Adam's learning rate are the paper's and the Chainer port's; the
    batch, the schedule and the weight averaging are capsnet's (README, Results).
    """

    dataset: str = "mnist"
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine: per step, lr -> lr_min by the end | exp: lr x lr_decay after every epoch
    lr_decay: float = 0.95  # exp: multiplied in after every epoch ...
    lr_min: float = 1e-5  # ... down to this floor (cosine: where it ends)
    ema_decay: float = 0.999  # > 0: evaluate and save an exponential moving average of the weights
    freeze_conv1_after: int = 0  # > 0: conv1 stops training after this many epochs (steps then skip
    # the PrimaryCaps input gradient: about 1.45x faster on the AMD VM, less since the GEMM convolution)
    max_shift: int = 2  # random translation, pixels, drawn per image
    max_rotation: float = 0.0  # > 0: also a random rotation, uniform in +- this many degrees ...
    max_scale: float = 0.0  # > 0: ... and scale, uniform in 1 +- this (then shifts are not whole pixels)
    elastic: float = 0.0  # > 0: also an elastic distortion of this strength (alpha, pixels; Simard et al. use 34) ...
    elastic_sigma: float = 4.0  # ... its displacement field blurred by a Gaussian of this sd (pixels)
    erase: int = 0  # > 0: then blank a square this many pixels wide at a random place in each image
    clean_epochs: int = 0  # > 0: the last this many epochs see the training images as they are (no augmentation)
    seed: int = 789
    val_size: int = 5000  # last images of the training set, held out for selection
    limit: int = 0  # use only the first N training images (0 = all)
    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_absent: float = 0.5
    recon_weight: float = 0.0005
    precision: str = "auto"  # auto | bf16 | fp32 | tf32
    test_every_epoch: bool = False
    eval_batch_size: int = 500
    compile: bool = True  # torch.compile (falls back to eager if it can't) ...
    compile_mode: str = "layer"  # ... the capsule layer | the whole model | the whole model as CUDA graphs
    recipe: str = "default"  # the named recipe these settings started from (see RECIPES)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0.0 or not self.lr_min >= 0.0:
            raise ValueError(f"lr must be positive and lr_min 0 or more, got {self.lr} and {self.lr_min}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.recon_weight >= 0.0:
            raise ValueError(f"recon_weight must be 0 or more, got {self.recon_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.freeze_conv1_after < 0:
            raise ValueError(f"freeze_conv1_after must be 0 (never) or a number of epochs, got {self.freeze_conv1_after}")
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")
        if self.clean_epochs < 0:
            raise ValueError(f"clean_epochs must be 0 (off) or a number of epochs, got {self.clean_epochs}")
        if not 0.0 <= self.elastic < math.inf or not 0.0 < self.elastic_sigma <= MAX_ELASTIC_SIGMA:
            raise ValueError(f"elastic must be 0 (off) or a finite strength and elastic_sigma in "
                             f"(0, {MAX_ELASTIC_SIGMA:g}] pixels, got {self.elastic} and {self.elastic_sigma}")
        if self.erase < 0:
            raise ValueError(f"erase must be 0 (off) or a square's width in pixels, got {self.erase}")
        if not 0.0 <= self.max_scale < 1.0:
            raise ValueError(f"max_scale must be in [0, 1), got {self.max_scale}")
        if not 0 <= self.seed <= MAX_SEED:  # (each epoch's stream is seeded from seed * 1,000,003: int64)
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")


SCHEDULES = ("exp", "cosine")
MAX_SEED = 2**32 - 1
MAX_ELASTIC_SIGMA = 100.0  # pixels: a blur far wider than the image only makes a smaller shift
INITS = ("default", "authors")
COMPILE_MODES = ("layer", "model", "graphs")
# The data sets `capsnet data` fetches and `capsnet train --dataset` trains on (module capsnet.data.<name with _>).
DATASETS = ("mnist", "fashion-mnist", "multimnist")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a config, ignoring unknown keys (from a newer version) and restoring tuples."""
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            continue
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


# What a run saved before these settings existed was trained with (capsnet 0.1's first recipe).
LEGACY_TRAIN_SETTINGS = {"schedule": "exp", "ema_decay": 0.0, "recipe": "chainer"}

# Named recipes: changes on top of the defaults (explicit flags change them further).
RECIPES: dict[str, dict] = {
    # Batches of 64 (on a CPU as fast per image as larger ones, and more updates per epoch), the
    # learning rate annealed to the floor by a cosine over the whole run, the moving average of
    # the weights evaluated; 50 epochs.
    "default": {},
    # The same for a laptop: as many epochs as fit in 40 minutes on a 2-core CPU (bf16; the AMD VM), at twice
    # the peak learning rate (chosen on validation over seeds 789 and 790: README, Results).
    "fast": {"epochs": 9, "lr": 2e-3},
    # The Chainer port's recipe as its README states it: batch 256, x0.95 per epoch, no averaging.
    "chainer": {"batch_size": 256, "schedule": "exp", "ema_decay": 0.0},
}


# Settings a data set changes on top of any recipe (explicit flags change them further).
DATASET_SETTINGS: dict[str, dict] = {
    # Each digit of a pair shifted up to 4 px (the paper's section 6), and a peak learning rate of
    # 1e-3 whatever the recipe: at the fast recipe's 2e-3 the capsules saturate and a run stayed at
    # chance (2.2% of pairs right after an epoch; README, MultiMNIST).
    "multimnist": {"max_shift": 4, "lr": 1e-3},
}


# The architecture's settings a recipe changes (ModelConfig's defaults otherwise; explicit flags win).
RECIPE_MODELS: dict[str, dict] = {
    # u_hat and the routing in float32 while the convolutions run in bf16 (README, Results).
    "fast": {"fp32_routing": True},
}


def _check_recipe(name: str) -> None:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")


def recipe_model_settings(name: str = "default") -> dict:
    """The ModelConfig settings a named recipe changes (a copy)."""
    _check_recipe(name)
    return dict(RECIPE_MODELS.get(name, {}))


def recipe_config(name: str = "default", **overrides) -> TrainConfig:
    """A named recipe's TrainConfig, then its data set's settings, then overrides (explicit flags) on top."""
    _check_recipe(name)
    dataset = DATASET_SETTINGS.get(overrides.get("dataset", TrainConfig.dataset), {})
    return TrainConfig(**{**RECIPES[name], **dataset, **overrides, "recipe": name})


__all__ = ["ModelConfig", "TrainConfig", "to_dict", "from_dict", "RECIPES", "DATASET_SETTINGS", "SCHEDULES", "COMPILE_MODES", "INITS",
           "MAX_ELASTIC_SIGMA", "MAX_SEED",
           "recipe_config", "recipe_model_settings", "RECIPE_MODELS"]
