"""Data sets as uint8 tensors in memory, and where they are cached."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DATASETS
from ..errors import CapsNetError
from .idx import decode_idx


@dataclass
class Dataset:
    """Images [n, c, h, w] uint8 and labels [n] int64, for a train and a test split.

    With digits > 1 (multimnist) each test image shows that many objects and its labels are
    [n, digits]; the training images are then the single digits the training loop overlays.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    digits: int = 1

    @property
    def in_channels(self) -> int:
        return self.test_images.shape[1]

    @property
    def image_size(self) -> int:
        """The side of the images the model sees (the test images': for multimnist, larger than the training digits)."""
        return self.test_images.shape[2]

    def subset(self, limit: int) -> "Dataset":
        """The first `limit` training images (all of them for 0); the test split is kept."""
        if limit <= 0:
            return self
        return Dataset(self.name, self.train_images[:limit], self.train_labels[:limit], self.test_images,
                       self.test_labels, self.num_classes, self.digits)


def default_data_dir() -> Path:
    return Path(os.environ.get("CAPSNET_DATA") or Path.home() / ".cache" / "capsnet")


def _as_images(arr) -> torch.Tensor:
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(1) if t.dim() == 3 else t  # [n, h, w] -> [n, 1, h, w]


def _source(name: str):
    """The module that fetches data set `name` (fetch(data_dir, log), CLASSES; BASE and derive(base)
    for a data set made from another one)."""
    if name not in DATASETS:
        raise CapsNetError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    return importlib.import_module(f".{name.replace('-', '_')}", __name__)


def class_names(name: str) -> tuple[str, ...]:
    """What each label of data set `name` stands for, in label order."""
    return _source(name).CLASSES


def load_dataset(name: str = "mnist", data_dir: Path | None = None, log=print) -> Dataset:
    """A data set's train and test splits, fetched into the cache first if they are not there."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    source = _source(name)
    if hasattr(source, "BASE"):
        return source.derive(load_dataset(source.BASE, data_dir, log))
    raw = source.fetch(data_dir, log)
    arrays = {key: decode_idx(data, name=key) for key, data in raw.items()}
    labels = lambda key: torch.from_numpy(arrays[key].astype("int64"))  # noqa: E731
    return Dataset(name, _as_images(arrays["train-images-idx3-ubyte"]), labels("train-labels-idx1-ubyte"),
                   _as_images(arrays["t10k-images-idx3-ubyte"]), labels("t10k-labels-idx1-ubyte"), 10)


def fetch_dataset(name: str = "mnist", data_dir: Path | None = None, log=print) -> Path:
    """Fetch and verify a data set into the cache; return its folder."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    source = _source(name)
    source.fetch(data_dir, log)
    return data_dir / getattr(source, "BASE", name)
