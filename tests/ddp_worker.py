"""Run by test_ddp.py under torchrun: a tiny training run, then each rank saves its weights."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import small_model_config, synthetic  # noqa: E402

from capsnet.config import TrainConfig  # noqa: E402
from capsnet.runtime import close_distributed, init_distributed  # noqa: E402
from capsnet.train import fit, prepare_run_dir  # noqa: E402

out = Path(sys.argv[1])
dist, device = init_distributed(torch.device("cpu"))
run = out / "run"
if dist.is_main:
    prepare_run_dir(run, force=False)
torch.distributed.barrier()
data = synthetic(n_train=100, n_test=20)
cfg = TrainConfig(epochs=2, batch_size=16, val_size=20, precision="fp32", compile=False)
model_cfg = small_model_config(data)
weights = {}
summary = fit(model_cfg, cfg, data, run, device, verbose=False, dist=dist,
              on_epoch_end=lambda epoch, model: weights.update(model.state_dict()))
torch.save({"rank": dist.rank, "world": dist.world, "summary": summary, "model": weights}, out / f"rank{dist.rank}.pt")
close_distributed()
