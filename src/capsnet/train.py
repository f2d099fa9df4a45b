"""One training loop: step -> train_one_epoch; predict -> evaluate; fit (run directory, resume, selection)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .checkpoint import first_reason, load_checkpoint, model_payload, train_state_payload
from .config import COMPILE_MODES, LEGACY_TRAIN_SETTINGS, ModelConfig, TrainConfig, from_dict, to_dict
from .averaging import WeightAverage
from .data import Dataset, multimnist
from .data.augment import augment
from .errors import CapsNetError
from .files import atomic_torch_save, atomic_write, write_json
from .losses import capsule_loss
from .model import CapsNet
from .runtime import SINGLE, DistInfo, autocast, configure, describe, resolve_precision

RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "model.pt", "final.pt", "summary.json")


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The random stream of one epoch (order and shifts), derived from (seed, epoch) alone.

    Because nothing carries over from earlier epochs, a resumed run draws exactly what an
    uninterrupted one would have.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + epoch)
    return g


def learning_rate(cfg: TrainConfig, t: float) -> float:
    """The learning rate at t epochs into the run (t = 2.5: halfway through the third epoch).

    exp: lr x lr_decay per finished epoch, down to the floor lr_min (constant within an epoch).
    cosine: half a cosine from lr at the start to lr_min at the end of the last epoch, per step.
    """
    if cfg.schedule == "cosine":
        done = min(t / max(cfg.epochs, 1), 1.0)
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * done))
    return max(cfg.lr * cfg.lr_decay ** math.floor(t), cfg.lr_min)


def compile_model(model: CapsNet, mode: str = "layer") -> None:
    """torch.compile the model in place (its parameters and state_dict keys unchanged).

    layer (default): the capsule layer alone. The routing loop is many small elementwise passes
    over u_hat; compiled, each iteration is one fused loop. On CPU, where the fused C++ routing
    kernel (cpu_kernels) builds, that is used instead and nothing is compiled.
    model: the whole forward pass (convolutions, routing, decoder), on CPU without the C++ kernel.
    graphs: the whole forward pass in torch.compile's "reduce-overhead" mode, which on a GPU
    replays each compiled forward and backward as one CUDA graph instead of launching kernel
    after kernel (on CPU it is the same as model).
    Where compilation fails (no C++ compiler, say) dynamo falls back to eager.
    """
    import torch._dynamo

    from . import cpu_kernels

    if mode not in COMPILE_MODES:
        raise CapsNetError(f"unknown compile mode {mode!r} (use {', '.join(COMPILE_MODES)})")
    torch._dynamo.config.suppress_errors = True
    if mode == "layer":
        if next(model.parameters()).device.type == "cpu" and cpu_kernels.available():
            return  # the hand-written routing kernel beats the compiled one on CPU (see bench)
        model.digits.compile()
        return
    model.compile(mode="reduce-overhead" if mode == "graphs" else None)


def conv1_trains(cfg: TrainConfig, epoch: int) -> bool:
    """Whether conv1's weights train in this (0-based) epoch. Frozen, conv1 needs no gradient, and
    so neither does the PrimaryCaps convolution's input: a step skips that whole GEMM (FreezeOut,
    Brock et al. 2017, freezes early layers for the same saving)."""
    return cfg.freeze_conv1_after == 0 or epoch < cfg.freeze_conv1_after


def augments(cfg: TrainConfig, epoch: int) -> bool:
    """Whether this (0-based) epoch's images are augmented: all but the last cfg.clean_epochs are.
    The idea: end on centred digits, like the test set's, at the schedule's lowest learning rates.
    On the fast recipe it was level on test (README, Results), so every recipe keeps it at 0."""
    return epoch < cfg.epochs - cfg.clean_epochs


def make_optimizer(model: CapsNet, cfg: TrainConfig, device: torch.device, *, fused: bool = True):
    """Adam; the fused implementation (one kernel for all parameters) on CPU and CUDA."""
    fused = fused and device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused or None)


def to_input(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [b, c, h, w] -> float32 in [0, 1] on device."""
    return images_u8.to(device, non_blocking=True).float().div_(255.0)


def top_classes(lengths: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The classes of the k longest capsules: [b] for k = 1, else [b, k], longest first."""
    return lengths.argmax(dim=1) if k == 1 else lengths.topk(k, dim=1).indices


def objects(labels: torch.Tensor) -> int:
    """How many labelled objects each image shows: 1 for labels [n], m for [n, m] (multimnist)."""
    return 1 if labels.dim() == 1 else labels.shape[1]


def matches(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[n] bool: right where the prediction is the label ([n]) or, for [n, m], names the same m classes."""
    if labels.dim() == 1:
        return predicted == labels
    return (predicted.sort(dim=1).values == labels.sort(dim=1).values).all(dim=1)


def step(model: CapsNet, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, precision: str,
         optimizer: torch.optim.Optimizer, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch: forward with reconstruction, loss, backward, update.

    target: what the decoder should reconstruct (default: the images themselves); for labels
    [b, m], each object alone, [b, m, c, h, w]. Returns (loss, number correct) as tensors, so
    a GPU is never made to wait for the host. Evaluation goes through predict(), which skips the decoder.
    """
    # Under --compile-mode graphs a new step may overwrite the last one's CUDA-graph outputs; say
    # where steps begin (a no-op for everything else). Nothing from an earlier step is kept.
    torch.compiler.cudagraph_mark_step_begin()
    with autocast(images.device, precision):
        # Training reconstructs through the true class (section 4.1), never through the winner.
        out = model(images, labels, reconstruct=True)
    loss, _, _ = capsule_loss(out.lengths, labels, out.recon, images if target is None else target, m_plus=cfg.m_plus, m_minus=cfg.m_minus,
                              lambda_absent=cfg.lambda_absent, recon_weight=cfg.recon_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = matches(top_classes(out.lengths, objects(labels)), labels).sum()
    return loss.detach(), correct


@dataclass
class EpochResult:
    loss: float
    acc: float
    seconds: float
    images: int


def train_one_epoch(model, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                    cfg: TrainConfig, epoch: int, precision: str, progress=None, *,
                    dist: DistInfo = SINGLE, average: WeightAverage | None = None,
                    overlay: bool = False) -> EpochResult:
    """One pass over (images, labels) in a fresh random order with fresh random shifts (none in the
    last cfg.clean_epochs epochs).

    overlay (multimnist): each digit is instead shifted (up to cfg.max_shift px) and overlaid on a random
    digit of another class from the same images (both drawn afresh every epoch); the decoder
    reconstructs each alone.

    The learning rate is set before every step (learning_rate at the fraction of the epoch done);
    average, if given, is updated after every step.

    model may be a DistributedDataParallel wrapper: every rank draws the same order and takes
    its own equal share of it (order[rank::world]), with shifts from its own stream. The
    returned loss and accuracy cover all ranks.
    """
    device = next(model.parameters()).device
    model.train()
    gen = epoch_generator(cfg.seed, epoch, device)
    n = images.shape[0]
    order = torch.randperm(n, generator=gen, device=device)
    if dist.world > 1:  # equal shares, so every rank runs the same number of steps
        order = order[: n - n % dist.world][dist.rank::dist.world]
        gen = epoch_generator(cfg.seed + 1 + dist.rank, epoch, device)
    augmented = augments(cfg, epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    start = time.perf_counter()
    for first in range(0, len(order), cfg.batch_size):
        idx = order[first:first + cfg.batch_size]
        target = None
        if overlay:
            y = labels[idx]
            other = multimnist.partners(labels, y, gen)
            pairs, parts = multimnist.overlay(images[idx], images[other], gen, cfg.max_shift)
            x, target = to_input(pairs, device), to_input(parts, device)  # [b, c, 36, 36], [b, 2, c, 36, 36]
            y = torch.stack([y, labels[other]], dim=1).to(device, non_blocking=True)
        else:
            x = to_input(images[idx.to(images.device)], device)
            if augmented:
                x = augment(x, cfg, gen)
            y = labels[idx.to(labels.device)].to(device, non_blocking=True)
        lr = learning_rate(cfg, epoch + first / len(order))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, ok = step(model, x, y, cfg, precision, optimizer, target)
        if average is not None:
            average.update()
        loss_sum += loss * len(idx)
        correct += ok
        if progress is not None:
            progress(len(idx) * dist.world, loss, ok * dist.world)
    seconds = time.perf_counter() - start
    seen = len(order) * dist.world
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
    if dist.world > 1:
        torch.distributed.all_reduce(totals)
    return EpochResult(totals[0].item() / seen, totals[1].item() / seen, seconds, seen)


@torch.no_grad()
def predict(model: CapsNet, images: torch.Tensor, batch_size: int, precision: str, k: int = 1) -> torch.Tensor:
    """Predicted class of every image (uint8 [n, c, h, w], unshifted): [n] on the model's device;
    with k > 1 (multimnist) the classes of the k longest capsules, [n, k].

    The winner is the longest digit capsule; the decoder is skipped. Nothing waits for the host.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predicted = []
    for first in range(0, images.shape[0], batch_size):
        # Under --compile-mode graphs each batch may overwrite the last one's graph outputs.
        torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, precision):
            out = model(to_input(images[first:first + batch_size], device), reconstruct=False)
        predicted.append(top_classes(out.lengths, k))  # [b] or [b, k], a fresh tensor outside any graph
    model.train(was_training)
    return torch.cat(predicted) if predicted else torch.zeros((0,) if k == 1 else (0, k), dtype=torch.long,
                                                                   device=device)


def evaluate(model: CapsNet, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
             precision: str) -> tuple[int, int]:
    """(number correct, number of images) on unshifted images; classification only. For labels
    [n, m] (multimnist) an image counts as right when the m longest capsules are its m classes."""
    predicted = predict(model, images, cfg.eval_batch_size, precision, objects(labels))
    return int(matches(predicted, labels.to(predicted.device)).sum().item()), images.shape[0]


def confusion(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[t, p]: how many images of class t were predicted as class p ([k, k] int64, on the CPU)."""
    pairs = labels.cpu().long() * num_classes + predicted.cpu().long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


# ----------------------------------------------------------------------------------- run directory


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_run_dir(run_dir: Path, *, force: bool) -> list[str]:
    """Create the run directory, refusing one that already holds a run unless forced. Returns the
    old run's files, which stay until `remove_run_files`: the caller removes them once the new
    run's settings have passed every check (`check_settings`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CapsNetError(f"{run_dir}: exists and is not a directory")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not force:
        if not saved_anything(run_dir):  # stopped (or failed) before its first epoch ended
            raise CapsNetError(f"{run_dir}: already holds a run that saved no epoch ({', '.join(existing)}); "
                               f"use --force to start over")
        if "last.pt" not in existing:  # logs (and models) without the state to continue from
            raise CapsNetError(f"{run_dir}: already holds a run ({', '.join(existing)}) with no last.pt to "
                               f"continue from; use --force to start over")
        raise CapsNetError(f"{run_dir}: already holds a run ({', '.join(existing)}); use --resume {run_dir} "
                           f"to continue it or --force to start over")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CapsNetError(f"{run_dir}: cannot write there ({exc.strerror or exc})") from None
    return existing


def saved_anything(run_dir: Path) -> bool:
    """Whether a run directory holds a logged epoch, a checkpoint or a test result (not only the
    config.json and empty metrics.jsonl of a run stopped in its first epoch)."""
    if any((run_dir / name).exists() for name in ("last.pt", "model.pt", "final.pt", "summary.json")):
        return True
    try:
        return bool((run_dir / "metrics.jsonl").read_text().strip())
    except (OSError, ValueError):
        return (run_dir / "metrics.jsonl").exists()


def remove_run_files(run_dir: Path, names: list[str]) -> None:
    """--force: the old run goes only now that the new one can start."""
    for name in names:
        (run_dir / name).unlink(missing_ok=True)


def check_settings(cfg: TrainConfig, data: Dataset, device: torch.device, dist: DistInfo = SINGLE) -> None:
    """What `fit` would refuse about these settings, for a caller to ask before it writes anything."""
    if dist.world > 1 and cfg.freeze_conv1_after:
        raise CapsNetError("--freeze-conv1-after works in one process only (DistributedDataParallel needs every "
                           "parameter's gradient)")
    if data.digits > 1:
        single = {"--rotate": cfg.max_rotation, "--scale": cfg.max_scale, "--elastic": cfg.elastic,
                  "--erase": cfg.erase, "--clean-epochs": cfg.clean_epochs}
        if any(single.values()):
            raise CapsNetError(f"{data.name}: its images are shifted pairs drawn afresh every epoch; "
                               f"{', '.join(k for k, v in single.items() if v)} work on single digits only")
        if not 0 <= cfg.max_shift <= multimnist.MAX_SHIFT:
            raise CapsNetError(f"{data.name}: its {multimnist.SIZE}x{multimnist.SIZE} images leave room for "
                               f"--shift 0 to {multimnist.MAX_SHIFT}, not {cfg.max_shift}")
    else:  # a shift of half the image or more can move the digit out of it; a square wider than it blanks it
        size = data.image_size
        if cfg.max_shift >= size // 2:
            raise CapsNetError(f"{data.name}: --shift {cfg.max_shift} could move what its {size}x{size} images show "
                               f"out of them; give 0 to {size // 2 - 1} px")
        if cfg.erase > size:
            raise CapsNetError(f"{data.name}: --erase {cfg.erase} is wider than its {size}x{size} images")
    resolve_precision(cfg.precision, device)
    train_x, train_y, _, _ = split_validation(data.subset(cfg.limit), cfg.val_size)
    if data.digits > 1:
        multimnist.check_classes(train_y, "training digits")


def split_validation(data: Dataset, val_size: int):
    """The last val_size training images are held out: (train_x, train_y, val_x, val_y).

    For multimnist these are digits, and the held-out ones are paired among themselves once
    (multimnist.fixed_pairs): val_x [v, c, 36, 36], val_y [v, 2]."""
    n = data.train_images.shape[0]
    if val_size < 0 or val_size >= n:
        raise CapsNetError(f"--val {val_size} must be between 0 and {n - 1} (the training set has {n} images)")
    cut = n - val_size
    val_x, val_y = data.train_images[cut:], data.train_labels[cut:]
    if data.digits > 1 and val_size:
        val_x, val_y = multimnist.fixed_pairs(val_x, val_y, multimnist.VAL_SEED, "validation digits")
    return data.train_images[:cut], data.train_labels[:cut], val_x, val_y


def model_config_for(data: Dataset, **overrides) -> ModelConfig:
    """Channels, size and classes from the data; the rest from overrides or defaults."""
    return ModelConfig(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes,
                       **overrides)


class EpochLog:
    """A tqdm bar per epoch on a terminal; one plain line per epoch otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None

    def start(self, epoch: int, epochs: int, total: int):
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="img", leave=True,
                            dynamic_ncols=True)
            self.steps, self.correct = 0, 0
            return self.update
        return None

    def update(self, n: int, loss: torch.Tensor, correct: torch.Tensor):
        """After each batch: advance the bar (tqdm shows img/s); loss and running accuracy every
        10 batches, since reading them waits for the device."""
        self.bar.update(n)
        self.steps += 1
        self.correct += correct  # a tensor: summed on the device, read below
        if self.steps % 10 == 1 or self.bar.n >= self.bar.total:
            acc = float(self.correct) / self.bar.n
            self.bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{acc * 100:.2f}%")

    def end(self, record: dict):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            parts = [f"epoch {record['epoch']}", f"lr {record['lr']:.2e}", f"loss {record['train_loss']:.4f}",
                     f"train {record['train_acc'] * 100:.2f}%"]
            if record.get("val_acc") is not None:
                parts.append(f"val {record['val_acc'] * 100:.2f}%")
            if record.get("test_acc") is not None:
                parts.append(f"test {record['test_acc'] * 100:.2f}%")
            parts += [f"{record['img_s']:.0f} img/s", f"{record['seconds']:.0f}s"]
            print("  ".join(parts), flush=True)


def _read_metrics(path: Path, upto: int) -> list[str]:
    """The logged epochs up to `upto` (last.pt's), as lines. A line that does not read as one epoch's
    record (cut short by a crash while it was written) is dropped: that epoch runs again."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(epoch, int) and epoch <= upto:
            kept.append(line)
    return kept


SESSION_KEYS = ("capsnet", "torch", "git_commit", "device", "device_name", "precision", "threads", "world_size",
                "argv")  # what may differ between the session that started a run and one that resumed it


def _with_resume(info: dict, config_path: Path, epoch: int) -> dict:
    """config.json for a resumed run: the starting session's command, code and machine stay on
    record, and this session is appended to "resumes" with the epoch it continued from."""
    try:
        started = json.loads(config_path.read_text())
        if not isinstance(started, dict):
            raise ValueError
    except (OSError, ValueError):
        return info  # nothing readable to keep: record this session as the run's own
    session = {"epoch": epoch, **{k: info[k] for k in SESSION_KEYS}}
    return {**info, **{k: started[k] for k in SESSION_KEYS if k in started},
            "resumes": [*(started.get("resumes") if isinstance(started.get("resumes"), list) else []), session]}


def fit(model_cfg: ModelConfig, cfg: TrainConfig, data: Dataset, run_dir: Path, device: torch.device, *,
        resume: dict | None = None, argv: list[str] | None = None, log: Callable = print,
        verbose: bool = True, dist: DistInfo = SINGLE,
        on_epoch_end: Callable[[int, CapsNet], None] | None = None) -> dict:
    """Train, checkpoint every epoch, select on validation, report test accuracy at the end.

    resume: a loaded last.pt; training continues after its epoch with its optimizer state.
    With cfg.ema_decay > 0 the weights' moving average is what gets evaluated and saved.
    Two models come out: model.pt, the epoch with the best validation accuracy (what `evaluate
    --load RUN` and `visualize` use), and final.pt, the last epoch's; summary.json tests both.
    dist: under torchrun, this process's rank; the model is wrapped in DistributedDataParallel
    and rank 0 alone evaluates, logs and writes the run directory.
    on_epoch_end(epoch, model): a hook called on every rank after each epoch's update.
    Returns the summary written to summary.json (empty on other ranks).
    """
    check_settings(cfg, data, device, dist)
    precision = resolve_precision(cfg.precision, device)
    configure(device, precision)
    train_x, train_y, val_x, val_y = split_validation(data.subset(cfg.limit), cfg.val_size)
    main = dist.is_main
    verbose = verbose and main

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = CapsNet(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start_epoch, best, elapsed = 0, {"val_acc": -1.0, "epoch": 0}, 0.0
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            if average is not None:
                average.load_state_dict(resume["average"])
            start_epoch, best = resume["epoch"], dict(resume["best"])
            elapsed = float(resume.get("elapsed", 0.0))
            torch.set_rng_state(resume["rng_cpu"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CapsNetError(f"{run_dir / 'last.pt'}: its saved state does not fit the run it describes "
                               f"({first_reason(exc)})") from None
    evaluated = average.model if average is not None else model  # what validation, test and model.pt see
    started = time.perf_counter() - elapsed  # wall time of the run, carried across resumes
    if cfg.compile:
        compile_model(model, cfg.compile_mode)
    trainee = model  # what the training step calls; `model` stays the plain module we save
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trainee = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Data stays where the model is: on a GPU the whole uint8 set fits and never crosses the bus.
    if device.type == "cuda":
        train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))

    metrics_path = run_dir / "metrics.jsonl"
    if main:
        info = {"capsnet": __version__, "torch": torch.__version__, "git_commit": git_commit(),
                "device": str(device), "device_name": describe(device), "precision": precision,
                "threads": torch.get_num_threads(), "world_size": dist.world, "argv": argv, "dataset": data.name,
                "train_images": int(train_x.shape[0]), "val_images": int(val_x.shape[0]),
                "model": to_dict(model_cfg), "train": to_dict(cfg)}
        if resume is not None:
            info = _with_resume(info, run_dir / "config.json", start_epoch)
        write_json(run_dir / "config.json", info)
        kept = _read_metrics(metrics_path, start_epoch)  # drop epochs after the checkpoint, if any
        atomic_write(metrics_path, "".join(line + "\n" for line in kept).encode())
    if verbose:
        sizes = (f"{train_x.shape[0]} train / {val_x.shape[0]} val images" if data.digits == 1 else
                 f"{train_x.shape[0]} train digits (paired afresh every epoch) / {val_x.shape[0]} val pairs")
        log(f"capsnet {__version__}: {data.name}, {sizes}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, {describe(device)}, {precision}"
            + (f", {dist.world} processes" if dist.world > 1 else ""))
    epoch_log = EpochLog(verbose)
    last_val = json.loads(kept[-1]).get("val_acc") if main and kept else None
    for epoch in range(start_epoch, cfg.epochs):
        lr = learning_rate(cfg, epoch)
        trains = conv1_trains(cfg, epoch)
        if trains != model.conv1.weight.requires_grad:
            model.conv1.requires_grad_(trains)
            if verbose and not trains:
                log(f"conv1 frozen from epoch {epoch + 1} on (--freeze-conv1-after {cfg.freeze_conv1_after})")
        progress = epoch_log.start(epoch, cfg.epochs, train_x.shape[0])
        result = train_one_epoch(trainee, optimizer, train_x, train_y, cfg, epoch, precision, progress, dist=dist,
                                 average=average, overlay=data.digits > 1)
        if not math.isfinite(result.loss):
            saved = f"last.pt keeps epoch {epoch}" if epoch else "no epoch had finished, so nothing was saved"
            raise CapsNetError(f"training diverged at epoch {epoch + 1} (loss {result.loss}); {saved}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model)
        if not main:
            continue
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": result.loss, "train_acc": result.acc,
                  "val_acc": None, "img_s": result.images / result.seconds, "seconds": result.seconds}
        if val_x.shape[0]:
            ok, n = evaluate(evaluated, val_x, val_y, cfg, precision)
            record["val_acc"] = ok / n
        if cfg.test_every_epoch:  # for curves only: never used to select
            ok, n = evaluate(evaluated, data.test_images, data.test_labels, cfg, precision)
            record["test_acc"] = ok / n
        selected = record["val_acc"] is None or record["val_acc"] >= best["val_acc"]
        if selected:
            best = {"val_acc": record["val_acc"] if record["val_acc"] is not None else -1.0, "epoch": epoch + 1}
            atomic_torch_save(model_payload(evaluated, epoch=epoch + 1, val_acc=record["val_acc"],
                                            dataset=cfg.dataset),
                              run_dir / "model.pt")
        record["elapsed"] = time.perf_counter() - started
        # The epoch's record first, then last.pt: a crash between the two resumes from the epoch
        # before, whose rerun drops the record and writes it again (the other order would lose it).
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        atomic_torch_save(train_state_payload(model, optimizer, cfg, epoch=epoch + 1, best=best, average=average,
                                              elapsed=record["elapsed"]), run_dir / "last.pt")
        last_val = record["val_acc"]
        epoch_log.end(record)

    if not main:
        return {}
    if cfg.epochs > 0 and start_epoch <= cfg.epochs:  # (also when resuming a finished run saved without it)
        atomic_torch_save(model_payload(evaluated, epoch=cfg.epochs, val_acc=last_val, dataset=cfg.dataset),
                          run_dir / "final.pt")
    return finish(run_dir, data, cfg, device, precision, log=log, verbose=verbose, started=started)


def finish(run_dir: Path, data: Dataset, cfg: TrainConfig, device: torch.device, precision: str, *,
           log: Callable = print, verbose: bool = True, started: float | None = None) -> dict:
    """Test the selected model (model.pt) and the final one (final.pt, if there) once each and write
    summary.json (with the run's wall time since `started`, a time.perf_counter() value, if given)."""
    path = run_dir / "model.pt"
    if not path.exists():  # zero epochs asked for
        return {}
    selected = load_checkpoint(path)
    ok, n = _test(selected, path, data, cfg, device, precision)
    summary = {"test_acc": ok / n, "test_errors": n - ok, "test_images": n, "selected_epoch": selected["epoch"],
               "val_acc": selected["val_acc"], "selection": "best validation accuracy"
               if selected["val_acc"] is not None else "last epoch (no validation split)", "precision": precision}
    if (run_dir / "final.pt").exists():
        final = load_checkpoint(run_dir / "final.pt")
        final_ok = ok if final["epoch"] == selected["epoch"] else \
            _test(final, run_dir / "final.pt", data, cfg, device, precision)[0]
        summary.update(final_epoch=final["epoch"], final_test_acc=final_ok / n, final_test_errors=n - final_ok)
    if started is not None:
        summary["wall_seconds"] = time.perf_counter() - started
    write_json(run_dir / "summary.json", summary)
    if verbose:
        log(f"test accuracy {ok / n * 100:.2f}% ({n - ok} errors in {n}) with the model of epoch "
            f"{selected['epoch']} ({summary['selection']}); saved in {run_dir}")
        if "final_test_acc" in summary:
            log(f"final model (epoch {summary['final_epoch']}, final.pt): {summary['final_test_acc'] * 100:.2f}% "
                f"({summary['final_test_errors']} errors)")
    return summary


def _test(ckpt: dict, path: Path, data: Dataset, cfg: TrainConfig, device: torch.device,
          precision: str) -> tuple[int, int]:
    """(number correct, number of test images) of a loaded model checkpoint."""
    from .checkpoint import build_model

    return evaluate(build_model(ckpt, path).to(device), data.test_images, data.test_labels, cfg, precision)


def resume_state(run_dir: Path) -> dict:
    """last.pt of a run directory, checked: every part `fit` reads is there and of its kind."""
    if run_dir.is_file():
        raise CapsNetError(f"{run_dir}: --resume takes the run's folder ({run_dir.parent}), not a file in it")
    if not run_dir.is_dir():
        raise CapsNetError(f"{run_dir}: no such run directory")
    path = run_dir / "last.pt"
    if not path.exists() and (run_dir / "config.json").exists():
        if not saved_anything(run_dir):
            raise CapsNetError(f"{run_dir}: the run stopped before its first epoch ended, so there is nothing to "
                               f"resume; start it again with --save {run_dir} --force")
        raise CapsNetError(f"{path}: no such checkpoint, so the run cannot continue (its logs and models stay)")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "train-state":
        raise CapsNetError(f"{path}: holds no training state to resume from")
    parts = {"epoch": (int, "whole number"), "model_config": (dict, "mapping"), "train_config": (dict, "mapping"),
             "model": (dict, "mapping"), "optimizer": (dict, "mapping"), "best": (dict, "mapping"),
             "rng_cpu": (torch.Tensor, "tensor")}
    for name, (kind, words) in parts.items():
        value = ckpt.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CapsNetError(f"{path}: damaged training state ({name!r} is missing or not a {words})")
    if ckpt["epoch"] < 0 or ckpt["rng_cpu"].dtype != torch.uint8 or not isinstance(ckpt["best"].get("epoch"), int):
        raise CapsNetError(f"{path}: damaged training state (its epoch, best epoch or random state)")
    return ckpt


def configs_from_state(ckpt: dict, path: Path | str = "last.pt") -> tuple[ModelConfig, TrainConfig]:
    """The architecture and training settings a last.pt was saved with (checked as the flags are)."""
    train = {**LEGACY_TRAIN_SETTINGS, **ckpt["train_config"]}
    try:
        model_cfg, cfg = from_dict(ModelConfig, ckpt["model_config"]), from_dict(TrainConfig, train)
    except (TypeError, ValueError) as exc:
        raise CapsNetError(f"{path}: its settings fail this version's checks ({first_reason(exc)})") from None
    if cfg.ema_decay > 0 and not isinstance(ckpt.get("average"), dict):
        raise CapsNetError(f"{path}: damaged training state (the run averages its weights, and no average is saved)")
    return model_cfg, cfg
