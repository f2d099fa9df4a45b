"""Two CPU processes under torchrun (gloo): same weights on both ranks, one run directory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_ranks_train_in_step(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(worker), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    # and those are the weights rank 0 saved in the one run directory
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    for key, value in saved.items():
        assert torch.equal(value, ranks[0]["model"][key]), key
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # written once, by rank 0
    assert ranks[0]["summary"]["test_images"] == 20 and ranks[1]["summary"] == {}
