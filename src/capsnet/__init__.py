"""capsnet: capsule networks with dynamic routing (Sabour, Frosst, Hinton 2017) in PyTorch."""
__version__ = "0.1.0"

from .checkpoint import load_model  # noqa: E402
from .config import ModelConfig, TrainConfig  # noqa: E402
from .model import CapsNet  # noqa: E402

__all__ = ["CapsNet", "ModelConfig", "TrainConfig", "load_model", "__version__"]
