"""Probe (not part of capsnet): branch a run after epoch K and train its last epochs without shifts.

    python tools/unshifted_end.py SNAP NEW     # then: capsnet train --resume NEW

SNAP is a copy of a run directory (last.pt, model.pt, config.json, metrics.jsonl) taken right
after epoch K was logged, before epoch K+1 overwrote last.pt. NEW becomes that run at epoch K
with `clean_epochs` set to the epochs left, so `--resume` trains epochs K+1.. on the images as
they are: the same as `capsnet train ... --clean-epochs N` from the start, at the cost of the
last N epochs alone. Resuming is bitwise identical to a straight run on the same number of
threads, and the first K epochs of a `--clean-epochs N` run are those of the run without it, so
NEW differs from the run SNAP came from in the missing shifts alone: a paired comparison.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from capsnet.checkpoint import load_checkpoint
from capsnet.errors import CapsNetError
from capsnet.files import atomic_torch_save, write_json


def main(snap: Path, new: Path) -> None:
    ckpt = load_checkpoint(snap / "last.pt")
    if ckpt.get("kind") != "train-state":
        raise SystemExit(f"{snap / 'last.pt'}: holds no training state")
    k, epochs = ckpt["epoch"], ckpt["train_config"]["epochs"]
    if ckpt["train_config"].get("clean_epochs", 0) > epochs - k:
        raise SystemExit(f"{snap}: epoch {k} of a run whose last {ckpt['train_config']['clean_epochs']} epochs "
                         "were already unshifted")
    logged = (snap / "metrics.jsonl").read_text().splitlines()
    if len(logged) != k:
        raise SystemExit(f"{snap}: metrics.jsonl logs {len(logged)} epochs, last.pt {k}: not a snapshot after epoch {k}")
    ckpt["train_config"]["clean_epochs"] = epochs - k
    config = json.loads((snap / "config.json").read_text())
    config["train"]["clean_epochs"] = epochs - k
    config["branched"] = {"from": str(snap), "after_epoch": k, "clean_epochs": epochs - k}
    new.mkdir(parents=True, exist_ok=False)
    atomic_torch_save(ckpt, new / "last.pt")
    shutil.copy(snap / "model.pt", new / "model.pt")  # the model `best` in last.pt refers to
    shutil.copy(snap / "metrics.jsonl", new / "metrics.jsonl")
    write_json(new / "config.json", config)
    print(f"{new}: {snap} after epoch {k}, unshifted from epoch {k + 1} on (clean_epochs {epochs - k})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    except (CapsNetError, OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"unshifted_end: {exc}") from None
