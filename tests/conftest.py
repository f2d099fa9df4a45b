import pytest
import torch

from capsnet.config import ModelConfig
from capsnet.data import Dataset, load_dataset


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST (fetched into the cache on first use, verified every time)."""
    return load_dataset("mnist", None, log=lambda *a: None)


def synthetic(n_train=96, n_test=40, size=20, channels=1, classes=4, seed=0) -> Dataset:
    """Tiny learnable data: class k lights up quadrant k, plus noise."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.randint(0, classes, (n,), generator=g)
        images = torch.randint(0, 60, (n, channels, size, size), generator=g).to(torch.uint8)
        h = size // 2
        for k in range(classes):
            r, c = divmod(k, 2)
            sel = labels == k
            images[sel, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 150
        return images, labels

    tx, ty = make(n_train)
    sx, sy = make(n_test)
    return Dataset("synthetic", tx, ty, sx, sy, classes)


@pytest.fixture
def tiny_data():
    return synthetic()


def small_model_config(data: Dataset, **kw) -> ModelConfig:
    """The paper's structure at a size that trains in a fraction of a second."""
    base = dict(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes,
                conv_channels=16, primary_types=4, primary_dim=8, digit_dim=8, decoder_hidden=(32, 64))
    base.update(kw)
    return ModelConfig(**base)
