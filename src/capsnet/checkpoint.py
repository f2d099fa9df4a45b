"""Checkpoints: plain dicts of tensors and numbers, written atomically, read without pickle code."""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from .config import ModelConfig, from_dict, to_dict
from .errors import CapsNetError

FORMAT = "capsnet-checkpoint"
VERSION = 1


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights_only=True: a file that is not ours fails in one line, running no code."""
    path = Path(path)
    if not path.is_file():
        raise CapsNetError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, PermissionError):
        raise  # not the file's fault (main() reports them in one line)
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes fail in arbitrary ways (IndexError, KeyError, ...)
        raise CapsNetError(f"{path}: not a capsnet checkpoint{_why_unreadable(exc)}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CapsNetError(f"{path}: not a capsnet checkpoint")
    version = obj.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CapsNetError(f"{path}: not a capsnet checkpoint (its format version is {version!r}, not a number)")
    if version > VERSION:
        raise CapsNetError(f"{path}: written by a newer capsnet (format version {version})")
    return obj


def _why_unreadable(exc: Exception) -> str:
    """The reason torch.load gave, in our words: its own message for a refused pickle advises
    loading the file again with weights_only=False, which is exactly what must not be done."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            return (f": it holds a Python object ({found.group(1)}) that only unpickling could build, "
                    "and capsnet never unpickles (nothing in the file was run)")
        return " (not a PyTorch file, or a damaged one)"
    if isinstance(exc, EOFError) or not text.strip():
        return " (empty or cut short)"
    first = text.strip().splitlines()[0].split(". ")[0]
    if not any(c.isalpha() for c in first):  # e.g. a KeyError's bare number: it would mean nothing to a reader
        return " (not a PyTorch file, or a damaged one)"
    return f" or corrupt ({first[:160]})"


def model_payload(model, *, epoch: int, val_acc: float | None, dataset: str | None = None) -> dict:
    """What model.pt holds: enough to rebuild and run the model (and the data set it was trained
    on, where known), nothing to resume training."""
    payload = {"format": FORMAT, "version": VERSION, "kind": "model", "model_config": to_dict(model.cfg),
               "model": model.state_dict(), "epoch": epoch, "val_acc": val_acc}
    if dataset is not None:
        payload["dataset"] = dataset
    return payload


def train_state_payload(model, optimizer, train_config, *, epoch: int, best: dict, average=None,
                        elapsed: float = 0.0) -> dict:
    """What last.pt holds: everything `--resume` needs to continue exactly where it stopped
    (average: the WeightAverage, if the recipe keeps one; elapsed: wall seconds so far)."""
    payload = {"format": FORMAT, "version": VERSION, "kind": "train-state", "epoch": epoch,
               "model_config": to_dict(model.cfg), "train_config": to_dict(train_config),
               "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best,
               "rng_cpu": torch.get_rng_state(), "elapsed": elapsed}
    if average is not None:
        payload["average"] = average.state_dict()
    return payload


def build_model(ckpt: dict, path: Path | str = "checkpoint"):
    """Rebuild a CapsNet from a checkpoint's own config and load its weights."""
    from .model import CapsNet

    try:
        cfg = from_dict(ModelConfig, ckpt["model_config"])
        model = CapsNet(cfg)
        model.load_state_dict(ckpt["model"])
    except KeyError as exc:
        raise CapsNetError(f"{path}: not a whole capsnet checkpoint (it holds no {exc.args[0]!r})") from None
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CapsNetError(f"{path}: weights do not fit the architecture it describes ({first_reason(exc)})") from None
    return model


def first_reason(exc: Exception) -> str:
    """The first informative line of an exception's message, shortened: PyTorch's load_state_dict
    opens with 'Error(s) in loading state_dict for CapsNet:' and gives the reason on the next line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    while len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines or [type(exc).__name__])[0][:160]


def checkpoint_file(path: Path | str) -> Path:
    """The checkpoint a path names: a run directory's model.pt, or the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
        if not path.exists():
            raise CapsNetError(f"{path.parent}: no model.pt in this run directory (has training finished an epoch?)")
    elif not path.exists():
        raise CapsNetError(f"{path}: no such run directory or checkpoint")
    return path


def load_model(path: Path | str):
    """A trained CapsNet from a run directory (its model.pt) or a checkpoint file, in eval mode."""
    path = checkpoint_file(path)
    return build_model(load_checkpoint(path), path).eval()


def load_model_and_dataset(path: Path | str):
    """load_model's model, and the data set its checkpoint records it was trained on (None for
    checkpoints written before capsnet recorded it), from one read of the file."""
    path = checkpoint_file(path)
    ckpt = load_checkpoint(path)
    name = ckpt.get("dataset", (ckpt.get("train_config") or {}).get("dataset"))  # model.pt; last.pt
    return build_model(ckpt, path).eval(), name if isinstance(name, str) else None


def check_fits(model, data, load: Path | str) -> None:
    """Refuse, in one line, data whose images are not the size and channels the model at `load` takes."""
    if (model.cfg.in_channels, model.cfg.image_size) != (data.in_channels, data.image_size):
        raise CapsNetError(f"{load}: the model takes {model.cfg.image_size}px images with {model.cfg.in_channels} "
                           f"channel(s), and {data.name}'s are {data.image_size}px with {data.in_channels}")
