"""Probe (not part of capsnet): other weight averages, and other routing counts, on one training run.

    python tools/probe_averages.py train ARGS...    # ARGS: those of `capsnet train`, with --save DIR

Runs `capsnet train ARGS` unchanged and keeps, beside the recipe's own moving average of the
weights, others that never touch training: moving averages with other decays and uniform
averages over the last k epochs. At the end it tests each, and the live weights, on the test set
and the validation split, then the run's own average again with 1, 2, 4 and 5 routing iterations
and in float32, and writes DIR/probe.json. The run itself (metrics, model.pt, final.pt,
summary.json) is the same as without the probe: the extra averages only read the weights. Reads
the run's data set from the default cache (no --data-dir). Each extra average costs one more pass over the
weights per step.
"""
import json
import sys
from pathlib import Path

import torch

import capsnet.train as T
from capsnet.averaging import WeightAverage
from capsnet.cli import main

DECAYS = [0.998, 0.9995, 0.9998]
TAILS = [1, 2, 3]  # uniform average over the last k epochs
state = {"epoch": 0, "epochs": None, "probe": None}


class Probe(WeightAverage):
    def __init__(self, source, decay):
        super().__init__(source, decay)
        self.source = source
        self.extras = {f"ema {d}": WeightAverage(source, d) for d in DECAYS}
        self.tails = {k: [WeightAverage(source, 0.5), 0] for k in TAILS}  # [holder, count]
        state["probe"] = self

    @torch.no_grad()
    def update(self):
        super().update()
        for e in self.extras.values():
            e.update()
        for k, slot in self.tails.items():
            if state["epoch"] >= state["epochs"] - k:
                slot[1] += 1
                torch._foreach_lerp_(slot[0]._avg, slot[0]._live, 1.0 / slot[1])


orig = T.train_one_epoch


def wrapped(*a, **kw):
    state["epoch"], state["epochs"] = a[5], a[4].epochs
    return orig(*a, **kw)


T.WeightAverage = Probe
T.train_one_epoch = wrapped
rc = main(sys.argv[1:])
p = state["probe"]
save = Path(sys.argv[sys.argv.index("--save") + 1])
cfg_json = json.loads((save / "config.json").read_text())
from capsnet.config import TrainConfig, from_dict
from capsnet.data import load_dataset

cfg = from_dict(TrainConfig, cfg_json["train"])
data = load_dataset(cfg.dataset, None, log=lambda *a: None)
_, _, val_x, val_y = T.split_validation(data.subset(cfg.limit), cfg.val_size)
models = {f"ema {cfg.ema_decay} (the run's)": p.model, "live": p.source, **{n: e.model for n, e in p.extras.items()},
          **{f"uniform last {k} epochs": slot[0].model for k, slot in p.tails.items()}}
out = {}
for name, m in models.items():
    t_ok, t_n = T.evaluate(m, data.test_images, data.test_labels, cfg, cfg_json["precision"])
    v_ok, v_n = T.evaluate(m, val_x, val_y, cfg, cfg_json["precision"])
    out[name] = {"test_errors": t_n - t_ok, "val_errors": v_n - v_ok}
    print(f"{name:32s} test errors {t_n - t_ok:3d}  val errors {v_n - v_ok:3d}")
# the run's own average, evaluated differently: other routing iterations at test time, float32
m = p.model
for iters in (1, 2, 4, 5):
    m.digits.routing_iters = iters
    t_ok, t_n = T.evaluate(m, data.test_images, data.test_labels, cfg, cfg_json["precision"])
    v_ok, v_n = T.evaluate(m, val_x, val_y, cfg, cfg_json["precision"])
    out[f"run's average, {iters} routing iterations at test"] = {"test_errors": t_n - t_ok, "val_errors": v_n - v_ok}
    print(f"routing iterations {iters} at test: test errors {t_n - t_ok:3d}  val errors {v_n - v_ok:3d}")
m.digits.routing_iters = cfg_json["model"]["routing_iters"]
t_ok, t_n = T.evaluate(m, data.test_images, data.test_labels, cfg, "fp32")
v_ok, v_n = T.evaluate(m, val_x, val_y, cfg, "fp32")
out["run's average, evaluated in fp32"] = {"test_errors": t_n - t_ok, "val_errors": v_n - v_ok}
print(f"evaluated in fp32: test errors {t_n - t_ok:3d}  val errors {v_n - v_ok:3d}")
(save / "probe.json").write_text(json.dumps(out, indent=1) + "\n")
sys.exit(rc)
