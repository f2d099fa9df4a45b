"""Probe (not part of capsnet): train a run's last epochs again without random shifts.

    python tools/unshifted_end.py RUN K NEW     # then: capsnet train --resume NEW

RUN must hold snap-eK.pt and snap-model-eK.pt, copies of its last.pt and model.pt taken right
after epoch K was logged. NEW becomes a run directory at epoch K whose training settings say
max_shift 0, so `--resume` trains epochs K+1.. on the images as they are. Resuming is bitwise
identical to a straight run and a zero shift draws nothing from the epoch's random stream (the
order is the same), so NEW differs from RUN in the missing shifts alone: a paired comparison.
NEW's config.json says max_shift 0 for the whole run; its first K epochs were shifted.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from capsnet.checkpoint import load_checkpoint
from capsnet.errors import CapsNetError
from capsnet.files import atomic_torch_save


def main(run: Path, k: int, new: Path) -> None:
    ckpt = load_checkpoint(run / f"snap-e{k}.pt")
    if ckpt.get("kind") != "train-state" or ckpt["epoch"] != k:
        raise SystemExit(f"{run / f'snap-e{k}.pt'}: not the training state after epoch {k}")
    ckpt["train_config"]["max_shift"] = 0
    new.mkdir(parents=True, exist_ok=False)
    atomic_torch_save(ckpt, new / "last.pt")
    shutil.copy(run / f"snap-model-e{k}.pt", new / "model.pt")  # the model `best` in last.pt refers to
    for name in ("config.json", "metrics.jsonl"):  # --resume drops the epochs logged after K
        shutil.copy(run / name, new / name)
    print(f"{new}: {run} after epoch {k}, max_shift 0 from epoch {k + 1} on")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    try:
        main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
    except (CapsNetError, OSError, ValueError) as exc:
        raise SystemExit(f"unshifted_end: {exc}") from None
