"""The `capsnet` command: argv -> configs -> the library's functions. The only argparse here."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from importlib import metadata
from pathlib import Path

from . import __version__
from .config import COMPILE_MODES, DATASET_SETTINGS, DATASETS, INITS, MAX_ELASTIC_SIGMA, MAX_SEED, RECIPES, SCHEDULES, ModelConfig, TrainConfig
from .errors import CapsNetError

# Model flags: None means "not given", so --resume can tell a conflicting flag from a default.
MODEL_FLAGS = {"routing_iters": "--routing-iters", "shared_weights": "--shared-weights",
               "leaky_relu": "--leaky-relu", "detach_routing": "--detach-routing", "fp32_routing": "--[no-]fp32-routing",
               "capsule_bias": "--capsule-bias", "init": "--init", "reconstruct": "--no-reconstruct"}
# Settings a resumed run may change: they don't alter what the run computes.
RESUMABLE = ("epochs", "test_every_epoch", "compile", "compile_mode")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:  # (nan too)
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return _finite(value)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # (nan too)
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return _finite(value)


def _finite(value: float) -> float:
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return value


def _blur_sd(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_ELASTIC_SIGMA:  # a blur wider than the image is a shift; the kernel would only grow
        raise argparse.ArgumentTypeError(f"must be at most {MAX_ELASTIC_SIGMA:g} pixels, got {value:g}")
    return value


def _decay(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _path(text: str) -> Path:
    if not text.strip():  # Path("") is the current folder: a run or pictures would land there unasked
        raise argparse.ArgumentTypeError("must name a file or folder, got an empty path")
    return Path(text)


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {value}")
    return value


def _degrees(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 180.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 180 degrees, got {value}")
    return value


# argparse names a value it cannot read by its type's __name__: "invalid whole number value: 'x'"
for _type, _kind in ((_positive, "whole number"), (_non_negative, "whole number"), (_positive_float, "number"),
                     (_non_negative_float, "number"), (_blur_sd, "number"), (_decay, "number"), (_fraction, "number"),
                     (_degrees, "number"), (_seed, "whole number")):
    _type.__name__ = _kind


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-g", "--gpu", type=int, default=None, help="GPU index, -1 for the CPU (the seed's flag)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--data-dir", type=_path, default=None, help="data cache (default $CAPSNET_DATA or ~/.cache/capsnet)")
    p.add_argument("--precision", default=None, help="auto (default: bf16 where fast), bf16, fp32 or tf32")


def _installed(package: str) -> str:
    """A package's installed version without importing it (torch takes seconds to import)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _trained_dataset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="the images to use (default: the run's, from its config.json; mnist where there is none)")


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"capsnet: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="capsnet", description="Capsule networks with dynamic routing.")
    parser.add_argument("--version", action="version",
                        version=f"capsnet {__version__} (torch {_installed('torch')})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a CapsNet; writes a run directory")
    t.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help=f"named settings to start from: default ({TrainConfig.epochs} epochs), fast ({RECIPES['fast']['epochs']} "
                        "epochs: under 40 minutes on a 2-core CPU), chainer (the Chainer port's); --dataset multimnist then sets "
                        "its own learning rate and shift; the flags below change them further")
    t.add_argument("-e", "--epoch", type=_positive, default=None, help=f"epochs (default: the recipe's, {TrainConfig.epochs}; fast: {RECIPES['fast']['epochs']})")
    t.add_argument("-b", "--batchsize", type=_positive, default=None, help="batch size (default 64)")
    t.add_argument("-d", "--decay", type=_decay, default=None, help="learning-rate decay per epoch with --schedule exp (0.95)")
    t.add_argument("--lr", type=_positive_float, default=None, help=f"peak learning rate (default: the recipe's, {TrainConfig.lr:g}; fast: {RECIPES['fast']['lr']:g}; "
                        f"multimnist: {DATASET_SETTINGS['multimnist']['lr']:g} whatever the recipe)")
    t.add_argument("--recon-weight", type=_positive_float, default=None, metavar="W",
                   help=f"weight of the reconstruction loss (sum of squared errors) beside the margin loss "
                        f"(default {TrainConfig.recon_weight:g}, the paper's)")
    t.add_argument("--shift", type=_non_negative, default=None,
                   help=f"largest random shift of a training image, in pixels (default {TrainConfig.max_shift}, the "
                        f"paper's; 0 = none; multimnist: of each digit, default {DATASET_SETTINGS['multimnist']['max_shift']}, "
                        "the paper's, at most 4 px: the room a 36x36 image leaves)")
    t.add_argument("--rotate", type=_degrees, default=None, metavar="DEG",
                   help="also rotate each training image at random by up to DEG degrees (default 0: not in the paper)")
    t.add_argument("--scale", type=_fraction, default=None, metavar="FRAC",
                   help="also scale each training image at random by 1 +- FRAC (default 0: not in the paper)")
    t.add_argument("--elastic", type=_non_negative_float, default=None, metavar="ALPHA",
                   help="also distort each training image elastically, by a smooth random field scaled by ALPHA "
                        "(Simard et al. 2003 use 34; default 0: not in the paper)")
    t.add_argument("--elastic-sigma", type=_blur_sd, default=None, metavar="PIXELS",
                   help=f"how smooth that field is: the sd of its Gaussian blur (default {TrainConfig.elastic_sigma:g})")
    t.add_argument("--erase", type=_non_negative, default=None, metavar="PIXELS",
                   help="also blank a PIXELS x PIXELS square at a random place in each training image "
                        "(default 0: not in the paper)")
    t.add_argument("--clean-epochs", type=_non_negative, default=None, metavar="N",
                   help="train the last N epochs on the images as they are: no shifts or other augmentation "
                        "(default 0: augment every epoch)")
    t.add_argument("--freeze-conv1-after", type=_non_negative, default=None, metavar="EPOCHS",
                   help="stop training conv1 after this many epochs (later steps are faster; default 0: never)")
    t.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="cosine: per step down to the floor by the last epoch (default); exp: x decay per epoch")
    t.add_argument("--ema", type=_fraction, default=None, metavar="DECAY",
                   help="evaluate and save a moving average of the weights (default 0.999; 0 = off)")
    t.add_argument("-s", "--seed", type=_seed, default=None, help="random seed (default 789)")
    t.add_argument("--save", type=_path, default=None, help="run directory (default runs/<dataset>)")
    t.add_argument("--resume", type=_path, default=None, help="continue the run in this directory")
    t.add_argument("--force", action="store_true", help="start over in a --save directory that holds a run")
    t.add_argument("--limit", type=_non_negative, default=None, help="use only the first N training images")
    t.add_argument("--val", type=_non_negative, default=None, help="images held out for validation (default 5000)")
    t.add_argument("--dataset", choices=DATASETS, default=None,
                   help="mnist (default), fashion-mnist (Zalando's clothing pictures in MNIST's format) or "
                        "multimnist (two overlapping digits per 36x36 image, made from MNIST: the paper's section 6)")
    t.add_argument("--routing-iters", type=_positive, default=None, help="routing iterations (default 3)")
    t.add_argument("--shared-weights", action="store_const", const=True, default=None,
                   help="one transformation matrix per capsule type (the Chainer port) instead of per capsule")
    t.add_argument("--leaky-relu", action="store_const", const=True, default=None, help="leaky ReLU (0.05) after conv1")
    t.add_argument("--detach-routing", action="store_const", const=True, default=None,
                   help="no gradient through u_hat in the inner routing iterations")
    t.add_argument("--fp32-routing", action=argparse.BooleanOptionalAction, default=None,
                   help="the predictions u_hat and the routing in float32 under bf16 (the convolutions stay bf16; "
                        "default: on in the fast recipe, off in the others)")
    t.add_argument("--capsule-bias", action="store_const", const=True, default=None,
                   help="a learned bias (from 0.1) added to each digit capsule before the squash (the authors' "
                        "published code; not in the paper)")
    t.add_argument("--init", choices=INITS, default=None,
                   help=f"starting weights: default (PyTorch's, matrices uniform in +-{ModelConfig.weight_init:g}) "
                        "or authors (the authors' published code: normals cut at 2 std, biases 0.1)")
    t.add_argument("--reconstruct", dest="reconstruct", action="store_const", const=True, default=None,
                   help="train with the reconstruction loss (the default)")
    t.add_argument("--no-reconstruct", dest="reconstruct", action="store_const", const=False,
                   help="no decoder, margin loss only")
    t.add_argument("--test-every-epoch", action="store_true", help="log test accuracy each epoch (curves only)")
    t.add_argument("--visualize", action="store_true", help="write the pictures into the run directory at the end")
    t.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the capsule layer (default on)")
    t.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="what to compile: layer (default), model, or graphs (the model as CUDA graphs on a GPU)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _device_args(t)

    e = sub.add_parser("evaluate", help="test (or validation) accuracy of a trained model")
    e.add_argument("--load", type=_path, required=True, help="run directory or checkpoint")
    e.add_argument("--split", choices=("test", "val"), default="test",
                   help="test (default), or val: the images the run held out to choose its model "
                        "(read from the run directory's config.json)")
    e.add_argument("-b", "--batchsize", type=_positive, default=500)
    _trained_dataset_arg(e)
    e.add_argument("--per-class", action="store_true",
                   help="also each class's accuracy and the classes its errors went to (from the confusion counts)")
    e.add_argument("--routing-iters", type=_positive, default=None, metavar="N",
                   help="route N times instead of as many as the model was trained with (default: those)")
    _device_args(e)

    v = sub.add_parser("visualize", help="reconstruction pictures of a trained model")
    v.add_argument("--load", type=_path, required=True, help="run directory or checkpoint")
    v.add_argument("--out", type=_path, default=None, help="folder for the PNGs (default: the run directory)")
    _trained_dataset_arg(v)
    _device_args(v)

    b = sub.add_parser("bench", help="time training steps and inference on synthetic data")
    b.add_argument("-b", "--batchsize", type=_positive, default=128)
    b.add_argument("--steps", type=_positive, default=10, help="timed steps (median reported)")
    b.add_argument("--warmup", type=_non_negative, default=3)
    b.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=True)
    b.add_argument("--compile-mode", choices=COMPILE_MODES, default="layer",
                   help="what to compile: layer (default), model, or graphs (the model as CUDA graphs on a GPU)")
    b.add_argument("--baseline", action="store_true", help="the plain formulation (library conv gradients, eager)")
    b.add_argument("--compare", action="store_true",
                   help="baseline and capsnet at fp32 and the default precision, each in its own process")
    b.add_argument("--frozen-conv1", action="store_true",
                   help="time training steps with conv1 frozen (as after train --freeze-conv1-after)")
    b.add_argument("--fp32-routing", action="store_true",
                   help="u_hat and the routing in float32 under bf16, as train --fp32-routing")
    b.add_argument("--json", action="store_true", help="one JSON line")
    _device_args(b)

    r = sub.add_parser("report", help="a markdown table of finished runs (as in the README)")
    r.add_argument("runs", nargs="*", type=Path, help="run directories (default: every run under --results)")
    r.add_argument("--results", type=_path, default=Path("docs/results"))
    r.add_argument("--ablation", action="store_true",
                   help="the architecture-switch table instead (with --seeds: one row per switch setting)")
    r.add_argument("--seeds", action="store_true",
                   help="pool runs that differ only in their seed: mean and standard deviation per recipe")
    r.add_argument("--curves", type=_path, default=None, metavar="PNG",
                   help="also draw the runs' training curves into this PNG (needs matplotlib)")
    r.add_argument("--paired", type=_path, default=None, metavar="JSON",
                   help="changes beside their twins without them, seed for seed, from a JSON list "
                        "(docs/results/tried.json; its folders relative to --results)")

    d = sub.add_parser("data", help="fetch and verify a data set into the cache")
    d.add_argument("--dataset", choices=DATASETS, default="mnist",
                   help="mnist (default), fashion-mnist, or multimnist (made from MNIST: fetches MNIST)")
    d.add_argument("--data-dir", type=_path, default=None, help="data cache (default $CAPSNET_DATA or ~/.cache/capsnet)")
    return parser


def _device(args):
    from .runtime import resolve_device

    return resolve_device(args.device, args.gpu)


def _tested_at(run_dir: Path) -> int | None:
    """The epoch whose final model a run's summary.json tested (None: no summary, or one that cannot
    say): a run extended with -e and stopped before its new test keeps an older summary."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        return summary.get("final_epoch") if isinstance(summary, dict) else None
    except (OSError, ValueError):
        return None


def cmd_train(args) -> int:
    from dataclasses import replace

    import torch.distributed

    from .config import recipe_config, recipe_model_settings
    from .data import load_dataset
    from .runtime import close_distributed, init_distributed
    from .train import (check_settings, configs_from_state, fit, model_config_for, prepare_run_dir,
                        remove_run_files, resume_state)

    dist, device = init_distributed(_device(args))  # under torchrun: this process's rank and device
    train_overrides = {"epochs": args.epoch, "batch_size": args.batchsize, "lr_decay": args.decay, "lr": args.lr,
                       "recon_weight": args.recon_weight, "seed": args.seed, "limit": args.limit,
                       "val_size": args.val, "dataset": args.dataset,
                       "precision": args.precision, "test_every_epoch": args.test_every_epoch or None,
                       "compile": args.compile, "schedule": args.schedule, "ema_decay": args.ema,
                       "max_shift": args.shift, "max_rotation": args.rotate, "max_scale": args.scale,
                       "elastic": args.elastic, "elastic_sigma": args.elastic_sigma,
                       "erase": args.erase, "clean_epochs": args.clean_epochs,
                       "compile_mode": args.compile_mode, "freeze_conv1_after": args.freeze_conv1_after}
    train_overrides = {k: v for k, v in train_overrides.items() if v is not None}
    model_overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}

    if args.resume is not None:
        if args.force:
            raise CapsNetError("--force starts a run over and --resume continues one: give one of them")
        if args.save is not None and args.save.resolve() != args.resume.resolve():
            raise CapsNetError("--save and --resume name different directories; a resumed run stays where it is")
        run_dir = args.run_dir = args.resume  # args.run_dir: for the Ctrl-C message (main)
        state = resume_state(run_dir)
        model_cfg, cfg = configs_from_state(state, run_dir / "last.pt")
        if args.recipe is not None and args.recipe != cfg.recipe:
            raise CapsNetError(f"{run_dir}: the run was started with --recipe {cfg.recipe}; it cannot switch to "
                               f"--recipe {args.recipe}")
        for key, value in model_overrides.items():
            if getattr(model_cfg, key) != value:
                raise CapsNetError(f"{run_dir}: the checkpoint was trained with {key}={getattr(model_cfg, key)}; "
                                   f"{MODEL_FLAGS[key]} asks for {value}. Start a new run instead")
        for key, value in train_overrides.items():
            if (key not in RESUMABLE or (key == "epochs" and cfg.schedule == "cosine")) and getattr(cfg, key) != value:
                raise CapsNetError(f"{run_dir}: the run was started with {key}={getattr(cfg, key)}; "
                                   f"resuming with {value} would not continue it")
        cfg = replace(cfg, **{k: v for k, v in train_overrides.items() if k in RESUMABLE})
        if cfg.epochs < state["epoch"]:
            raise CapsNetError(f"{run_dir}: the run has trained {state['epoch']} epochs already; -e {cfg.epochs} "
                               f"would end it before where it stopped")
        # Finished and tested: nothing to train (a second `make train` only redraws the pictures)
        finished = cfg.epochs == state["epoch"] and _tested_at(run_dir) == state["epoch"]
        if finished and dist.is_main and not args.quiet:
            print(f"{run_dir}: finished its {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''} and was tested "
                  f"already; nothing to train (`capsnet evaluate --load {run_dir}` tests it again)")
        old_files = []
    else:
        state, finished = None, False
        cfg = recipe_config(args.recipe or "default", **train_overrides)
        run_dir = args.save or Path("runs") / cfg.dataset
        args.run_dir = run_dir
        old_files = prepare_run_dir(run_dir, force=args.force) if dist.is_main else []

    if dist.world > 1 and not dist.is_main:
        torch.distributed.barrier()  # rank 0 fetches the data first, the others then read its cache
    data = load_dataset(cfg.dataset, args.data_dir, log=print if dist.is_main else (lambda *a: None))
    if dist.world > 1 and dist.is_main:
        torch.distributed.barrier()
    if state is None:
        model_cfg = model_config_for(data, **{**recipe_model_settings(cfg.recipe), **model_overrides})
    if args.visualize and not model_cfg.reconstruct:
        raise CapsNetError("--visualize draws with the decoder, and --no-reconstruct trains none")
    check_settings(cfg, data, device, dist)
    remove_run_files(run_dir, old_files)
    if not finished:
        fit(model_cfg, cfg, data, run_dir, device, resume=state, argv=sys.argv[1:], verbose=not args.quiet, dist=dist)
    close_distributed()
    if args.visualize and dist.is_main:
        from .viz import write_all

        paths = write_all(run_dir, data, run_dir, device, cfg.precision)
        if not args.quiet:
            print(f"wrote {len(paths)} picture{'s' if len(paths) > 1 else ''} to {run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from .checkpoint import check_fits, load_model_and_dataset
    from .config import TrainConfig
    from .data import class_names, load_dataset
    from .runtime import resolve_precision
    from .train import confusion, evaluate, predict, split_validation

    device = _device(args)
    model, recorded = load_model_and_dataset(args.load)
    model = model.to(device)
    held_out = _held_out_split(args.load) if args.split == "val" else None  # before the data is fetched
    dataset = args.dataset or _trained_on(args.load, recorded)
    data = load_dataset(dataset, args.data_dir, log=lambda *a: print(*a, file=sys.stderr))
    check_fits(model, data, args.load)
    if recorded is not None and dataset != recorded:  # allowed (images of the same size), but said
        print(f"note: {args.load} was trained on {recorded}; testing it on {dataset} as asked", file=sys.stderr)
    if held_out is None:
        name, images, labels = "test", data.test_images, data.test_labels
    else:
        limit, val_size = held_out
        _, _, images, labels = split_validation(data.subset(limit), val_size)
        name = "validation"
    cfg = TrainConfig(eval_batch_size=args.batchsize)
    precision = resolve_precision(args.precision or "auto", device)
    trained_iters = model.digits.routing_iters
    if args.routing_iters is not None:
        model.digits.routing_iters = args.routing_iters  # only how many times it routes: the weights stay
    if args.per_class:
        if data.digits > 1:
            raise CapsNetError(f"--per-class counts one class per image, and {dataset}'s images show {data.digits}")
        counts = confusion(predict(model, images, args.batchsize, precision), labels, model.cfg.num_classes)
        ok, n = int(counts.trace()), images.shape[0]
    else:
        ok, n = evaluate(model, images, labels, cfg, precision)
    routing = "" if args.routing_iters is None else \
        f", {args.routing_iters} routing iteration{'s' if args.routing_iters > 1 else ''} (trained with {trained_iters})"
    on = "" if dataset == "mnist" else f" on {dataset}"
    print(f"{name} accuracy{on} {ok / n * 100:.2f}% ({errors_in(n - ok, n)}), {precision}{routing}")
    if args.per_class:
        print("\n".join(per_class_lines(counts, class_names(dataset))))
    return 0


def per_class_lines(counts, names) -> list[str]:
    """One line per class: right of how many, and the (up to three) classes its errors went to most."""
    width = max(len(str(n)) for n in names)
    lines = []
    for true, row in enumerate(counts.tolist()):
        wrong = sorted(((c, p) for p, c in enumerate(row) if p != true and c), key=lambda cp: (-cp[0], cp[1]))
        went = ", ".join(f"{names[p]} {c}" for c, p in wrong[:3]) + (", ..." if len(wrong) > 3 else "")
        share = f"{row[true] / sum(row) * 100:5.1f}%" if sum(row) else "    -"
        lines.append(f"  {names[true]:<{width}}  {share}  {row[true]} of {sum(row)}"
                     + (f"; read as {went}" if went else ""))
    return lines


def errors_in(errors: int, images: int) -> str:
    return f"{errors} error{'' if errors == 1 else 's'} in {images}"


def _interrupted(args) -> str:
    """What Ctrl-C leaves: for train, a run to resume only once an epoch has ended (last.pt)."""
    if args.command != "train":
        return "capsnet: interrupted"
    run = getattr(args, "run_dir", None)  # set by cmd_train once it knows the run's directory
    if run is not None and (run / "last.pt").is_file():
        return f"capsnet: interrupted; training continues from the last finished epoch with --resume {run}"
    return "capsnet: interrupted before the first epoch ended: no last.pt to resume from"


def _logged_settings(load: Path, what: str) -> tuple[Path, dict | None]:
    """The "train" settings in the config.json of the run that wrote this run directory or
    checkpoint, and that file's path; None for the settings where there is no such file."""
    run_dir = load if load.is_dir() else load.parent
    path = run_dir / "config.json"
    try:
        train = json.loads(path.read_text())["train"]
        if not isinstance(train, dict):
            raise TypeError
    except FileNotFoundError:
        return path, None
    except (OSError, ValueError, KeyError, TypeError):  # ValueError: not JSON, or not text
        raise CapsNetError(f"{path}: cannot read the run's {what} from it") from None
    return path, train


def _trained_on(load: Path, recorded: str | None) -> str:
    """The data set the model was trained on: as its checkpoint records it; for checkpoints from
    before that was recorded, as its run's config.json says; mnist where neither says."""
    where, name = load, recorded
    if name is None:
        where, train = _logged_settings(load, "data set (--dataset names it)")
        name = (train or {}).get("dataset", "mnist")
    if name not in DATASETS:
        raise CapsNetError(f"{where}: the model was trained on {name!r}, which this version does not know "
                           f"(known: {', '.join(DATASETS)}; --dataset names the images to use)")
    return name


def _held_out_split(load: Path) -> tuple[int, int]:
    """(limit, val_size) of the run that wrote this run directory or checkpoint: its validation
    images are the last val_size of its first `limit` training images (all of them for 0)."""
    path, train = _logged_settings(load, "validation split")
    if train is None:
        raise CapsNetError(f"{path.parent}: no config.json, so the run's validation images are unknown "
                           "(--split val reads them from a run directory)")
    try:
        limit, val_size = int(train.get("limit", 0)), int(train["val_size"])
    except (ValueError, KeyError, TypeError, OverflowError):
        raise CapsNetError(f"{path}: cannot read the run's validation split from it") from None
    if val_size <= 0:
        raise CapsNetError(f"{path.parent}: the run held out no validation images (--val 0)")
    return limit, val_size


def cmd_visualize(args) -> int:
    from .checkpoint import load_model_and_dataset
    from .data import load_dataset
    from .viz import write_all

    device = _device(args)
    model, recorded = load_model_and_dataset(args.load)  # a bad path or file fails here, before any fetch
    dataset = args.dataset or _trained_on(args.load, recorded)
    data = load_dataset(dataset, args.data_dir, log=lambda *a: print(*a, file=sys.stderr))
    out = args.out or (args.load if args.load.is_dir() else args.load.parent)
    paths = write_all(args.load, data, out, device, args.precision or "auto", model=model)
    names = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    print(f"wrote {len(paths)} picture{'s' if len(paths) > 1 else ''} to {out}: {names}")
    return 0


def cmd_bench(args) -> int:
    from .bench import format_table, run_bench, run_in_subprocess
    from .runtime import resolve_precision

    device = _device(args)
    resolve_precision(args.precision or "auto", device)  # a bad value stops here, before any bench runs
    if args.compare:
        alone = [flag for flag, given in (("--baseline", args.baseline), ("--frozen-conv1", args.frozen_conv1),
                                          ("--fp32-routing", args.fp32_routing), ("--no-compile", not args.compile),
                                          ("--compile-mode", args.compile_mode != "layer")) if given]
        if alone:
            raise CapsNetError(f"--compare times the baseline and capsnet as they come, so it cannot take "
                               f"{', '.join(alone)}")
        common = ["--device", str(device), "-b", str(args.batchsize), "--steps", str(args.steps),
                  "--warmup", str(args.warmup)]
        rows = []
        for precision in ("fp32", args.precision or "auto"):
            for extra in (["--baseline"], []):
                rows.append(run_in_subprocess(common + ["--precision", precision] + extra))
        print("\n".join(json.dumps(r) for r in rows) if args.json else format_table(rows))
        return 0
    result = run_bench(device, precision=args.precision or "auto", batch=args.batchsize, steps=args.steps,
                       warmup=args.warmup, compile=args.compile, compile_mode=args.compile_mode,
                       baseline=args.baseline, frozen_conv1=args.frozen_conv1, fp32_routing=args.fp32_routing)
    print(json.dumps(result) if args.json else format_table([result]))
    return 0


def cmd_report(args) -> int:
    from .report import ablation_table, finished_runs, paired_table, results_table, seeds_table, training_curves

    if args.paired is not None:
        try:
            changes = json.loads(args.paired.read_text())
        except ValueError as exc:  # not JSON, or not text at all (UnicodeDecodeError)
            raise CapsNetError(f"{args.paired}: not JSON ({exc})") from None
        if not isinstance(changes, list):
            raise CapsNetError(f"{args.paired}: must hold a list of changes")
        print(paired_table(changes, args.results))
        return 0
    folders = args.runs or finished_runs(args.results)
    if not folders:
        raise CapsNetError(f"{args.results}: no finished runs (folders with summary.json) here")
    if args.ablation:
        print(ablation_table(folders, pooled=args.seeds))
    else:
        print((seeds_table if args.seeds else results_table)(folders))
    if args.curves is not None:
        training_curves(folders, args.curves)
    return 0


def cmd_data(args) -> int:
    from .data import fetch_dataset

    folder = fetch_dataset(args.dataset, args.data_dir)
    made = "" if folder.name == args.dataset else f"made from {folder.name}, "  # multimnist: from MNIST's files
    print(f"{args.dataset}: {made}verified in {folder}")
    return 0


def _out_of_memory(exc: RuntimeError) -> bool:
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text or type(exc).__name__ == "OutOfMemoryError"


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "visualize": cmd_visualize, "bench": cmd_bench,
            "report": cmd_report, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, see Parser) and --help
        return int(exc.code or 0)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return code
    except BrokenPipeError:  # e.g. `capsnet report | head`: stop quietly, as a pipe's writer does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell reports for such a writer
    except CapsNetError as exc:
        print(f"capsnet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    except MemoryError:
        print("capsnet: error: out of memory; try a smaller --batchsize", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # PyTorch reports a failed allocation (CPU or GPU) as a RuntimeError
        if not _out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or ["out of memory"])[0]
        print(f"capsnet: error: out of memory ({first[:120]}); try a smaller --batchsize", file=sys.stderr)
        return 2
    except OSError as exc:
        why = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            why += " (a file stands where a folder is needed)"
        print(f"capsnet: error: {exc.filename or ''}{': ' if exc.filename else ''}{why}", file=sys.stderr)
        return 2
