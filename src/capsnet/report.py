"""Tables and curves from run directories: the README's results are rebuilt from the logged runs.

Each run directory (as `capsnet train` writes it, or its small files copied under
docs/results/) holds config.json, metrics.jsonl and summary.json; nothing else is read.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .config import LEGACY_TRAIN_SETTINGS, RECIPES, ModelConfig, TrainConfig, recipe_config, to_dict
from .errors import CapsNetError

# Settings left out of a run's recipe label: they don't change what is trained, or the tables give
# them their own column (epochs, batch, precision).
_NOT_RECIPE = {"recipe", "seed", "epochs", "batch_size", "precision", "test_every_epoch", "eval_batch_size",
               "compile", "compile_mode"}


def read_run(folder: Path) -> dict:
    """One row: what ran, where, how long, and the selected model's test accuracy."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and not (folder / "summary.json").exists():
        raise CapsNetError(f"{folder}: training has not finished ({_epochs_logged(folder)}); "
                           f"`capsnet train --resume {folder}` continues it")
    try:
        config = json.loads((folder / "config.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not text (UnicodeDecodeError)
        raise CapsNetError(f"{folder}: not a finished run directory ({exc})") from None
    _check_run_files(folder, config, summary, records)
    train = config.get("train", {})
    model = config.get("model", {})
    final_acc, final_errors = summary.get("final_test_acc"), summary.get("final_test_errors")
    finished = bool(records) and records[-1]["epoch"] == train.get("epochs")
    if final_acc is None and finished and summary.get("selected_epoch") == records[-1]["epoch"]:
        final_acc, final_errors = summary["test_acc"], summary["test_errors"]  # model.pt is the final model
    if final_acc is None and finished and "test_acc" in records[-1]:
        # Runs from before final.pt that logged test accuracy every epoch (for curves): the last
        # record is the final model tested on the full test set, the same figure final.pt gives.
        final_acc = records[-1]["test_acc"]
        final_errors = round((1 - final_acc) * summary["test_images"])
    # Without a validation split (--val 0) nothing was chosen: model.pt is the final model.
    validated = config.get("val_images", train.get("val_size", 1)) != 0
    return {
        "name": folder.name,
        "validated": validated,
        "test_acc": summary["test_acc"],
        "test_errors": summary["test_errors"],
        "epochs": len(records),
        "selected_epoch": summary.get("selected_epoch"),
        "final_test_acc": final_acc,
        "final_test_errors": final_errors,
        "recipe": recipe_label(train),
        "seed": train.get("seed"),
        "seconds": sum(r["seconds"] for r in records),
        "img_s": sum(r["img_s"] for r in records) / len(records) if records else 0.0,
        "precision": config.get("precision"),
        "batch": train.get("batch_size"),
        "device": config.get("device_name"),
        "command": "capsnet " + " ".join(config.get("argv") or []),
        "commit": (config.get("git_commit") or "")[:7],
        "wall_seconds": summary.get("wall_seconds"),
        "val_acc": summary.get("val_acc"),
        "routing_iters": model.get("routing_iters"),
        "reconstruct": model.get("reconstruct"),
        "shared_weights": model.get("shared_weights"),
        "leaky_relu": model.get("leaky_relu"),
        "capsule_bias": model.get("capsule_bias"),
        "fp32_routing": model.get("fp32_routing"),
        "weight_init": model.get("weight_init"),
        "init": model.get("init"),
        "records": records,
    }


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_number(value)


def _check_run_files(folder: Path, config, summary, records: list) -> None:
    """Refuse, in one line naming the file and the entry, logs whose JSON is well formed but not what
    `capsnet train` writes (edited by hand, cut and pasted, or from another program)."""
    def bad(name: str, what: str):
        raise CapsNetError(f"{folder / name}: {what} (not as capsnet train writes it)")

    if not isinstance(config, dict):
        bad("config.json", "not a JSON object")
    for part in ("train", "model"):
        settings = config.get(part, {})
        if not isinstance(settings, dict):
            bad("config.json", f"{part!r} is not an object")
        for key, value in settings.items():
            if not (_is_scalar(value) or part == "model" and isinstance(value, list) and all(map(_is_number, value))):
                bad("config.json", f"{part}.{key} is {value!r:.40}")
    argv = config.get("argv")
    if argv is not None and not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        bad("config.json", "'argv' is not a list of words")
    for key in ("git_commit", "device_name", "precision"):
        if not isinstance(config.get(key), (str, type(None))):
            bad("config.json", f"{key!r} is not text")
    if not isinstance(summary, dict):
        bad("summary.json", "not a JSON object")
    for key in ("test_acc", "test_errors"):
        if not _is_number(summary.get(key)):
            bad("summary.json", f"{key!r} is missing or not a number")
    for key in ("final_test_acc", "final_test_errors", "val_acc", "wall_seconds", "selected_epoch", "test_images"):
        if summary.get(key) is not None and not _is_number(summary[key]):
            bad("summary.json", f"{key!r} is not a number")
    if records and isinstance(records[-1], dict) and "test_acc" in records[-1] and not _is_number(
            summary.get("test_images")) and summary.get("final_test_acc") is None:
        bad("summary.json", "'test_images' is missing or not a number")  # (counts the last epoch's test errors)
    for line, record in enumerate(records, 1):
        if not isinstance(record, dict):
            bad("metrics.jsonl", f"line {line} is not a JSON object")
        for key in ("epoch", "seconds", "img_s", "train_loss"):
            if not _is_number(record.get(key)):
                bad("metrics.jsonl", f"line {line}: {key!r} is missing or not a finite number")
        for key in ("train_acc", "val_acc", "test_acc", "lr"):
            if record.get(key) is not None and not _is_number(record[key]):
                bad("metrics.jsonl", f"line {line}: {key!r} is not a finite number")


def recipe_label(train: dict) -> str:
    """The run's named recipe and every setting its flags changed: 'default + max_rotation 10,
    max_scale 0.1'. Settings a config.json lacks (runs older than the setting) are not compared.
    A data set other than MNIST is named, and the settings it sets itself (config.DATASET_SETTINGS)
    count as the recipe's, not as changes."""
    name = train.get("recipe", LEGACY_TRAIN_SETTINGS["recipe"])
    if name not in RECIPES:
        return name
    recipe = to_dict(recipe_config(name, dataset=train.get("dataset", TrainConfig.dataset)))
    recipe["dataset"] = TrainConfig.dataset
    changed = [f"{key} {train[key]:g}" if isinstance(train[key], float) else f"{key} {train[key]}"
               for key in recipe if key not in _NOT_RECIPE and key in train and train[key] != recipe[key]]
    changed = ["val_size 0 (all training images, no validation)" if c == "val_size 0" else c for c in changed]
    return name + (" + " + ", ".join(changed) if changed else "")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the header, the separator, one line per row (cells as str())."""
    lines = [header, ["---"] * len(header)] + [[str(cell) for cell in row] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _accuracy(acc: float | None, errors: int | None) -> str:
    return "-" if acc is None else f"{acc * 100:.2f}% ({errors})"


def results_table(folders: list[Path]) -> str:
    """A markdown table, one row per finished run, in the order given: the test accuracy of the model
    chosen on validation (model.pt) and of the final model (final.pt). Training time sums the epochs'
    training loops; wall time (logged since capsnet 0.1's recipes) runs from the start of training to
    the test result, evaluations and checkpoints included."""
    rows = []
    for r in (read_run(f) for f in folders):
        wall = f"{r['wall_seconds'] / 60:.1f} min" if r["wall_seconds"] is not None else "-"
        chosen = _accuracy(r["test_acc"], r["test_errors"]) if r["validated"] else "- (no validation split)"
        rows.append([r["name"], chosen,
                     _accuracy(r["final_test_acc"], r["final_test_errors"]), f"{r['epochs']} ({r['selected_epoch']})",
                     f"{r['seconds'] / 60:.1f} min", wall, f"{r['img_s']:.0f}", f"{r['precision']}, {r['batch']}",
                     r["device"], f"`{r['command']}`", r["commit"]])
    return markdown_table(["run", "test, validation-chosen model (errors)", "test, final model (errors)",
                           "epochs (chosen)", "training time", "wall time", "train img/s", "precision, batch",
                           "machine", "command", "commit"], rows)


def _mean_std(values: list[float]) -> str:
    """'99.61 +- 0.04% (n=6)': mean and sample standard deviation, in percent ('99.60% (n=1)' for one)."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean * 100:.2f}% (n=1)"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean * 100:.2f} +- {std * 100:.2f}% (n={len(values)})"


def _architecture(r: dict) -> str:
    """The paper's architecture, or what differs from it (settings a config.json lacks: as the paper)."""
    iters = r["routing_iters"]
    changes = [(iters != 3, f"{iters} routing iteration{'' if iters == 1 else 's'}"),
               (r["reconstruct"] is False, "no reconstruction"),
               (r["shared_weights"], "shared matrices"),
               (r["leaky_relu"], "leaky ReLU"),
               (r["capsule_bias"], "capsule bias"),
               (r["fp32_routing"], "float32 routing"),
               (r["weight_init"] not in (None, ModelConfig.weight_init), f"matrices from +-{r['weight_init']}"),
               (r["init"] not in (None, ModelConfig.init), f"{r['init']} init")]
    return ", ".join(label for differs, label in changes if differs) or "paper"


def seeds_table(folders: list[Path]) -> str:
    """Runs that differ only in their seed, pooled: one row per (recipe, epochs, batch, precision,
    machine), with the mean and standard deviation of both test figures over the seeds (the
    validation-chosen one over the runs that had a validation split)."""
    groups: dict[tuple, list[dict]] = {}
    for r in (read_run(f) for f in folders):
        key = (r["recipe"], _architecture(r), r["epochs"], r["batch"], r["precision"], r["device"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (recipe, architecture, epochs, batch, precision, device), runs in groups.items():
        finals = [r["final_test_acc"] for r in runs if r["final_test_acc"] is not None]
        rows.append([recipe, architecture, epochs, f"{batch}, {precision}", device,
                     ", ".join(str(r["seed"]) for r in runs),
                     _mean_std([r["test_acc"] for r in runs if r["validated"]]),
                     _mean_std(finals)])
    return markdown_table(["recipe", "architecture", "epochs", "batch, precision", "machine", "seeds",
                           "test, validation-chosen model", "test, final model"], rows)


def _switches(r: dict) -> tuple:
    """A run's ablation columns: routing iterations, reconstruction, matrices, activation, epochs."""
    return (r["routing_iters"], "yes" if r["reconstruct"] else "no",
            "shared per type" if r["shared_weights"] else "one per capsule",
            "leaky ReLU" if r["leaky_relu"] else "ReLU", r["epochs"])


def ablation_table(folders: list[Path], *, pooled: bool = False) -> str:
    """The architecture switches of the paper's Table 1 and the Chainer port, one row per run; pooled,
    one row per switch setting with the mean and standard deviation over its runs (its seeds) and each
    run's test errors, named after its first run without a trailing seed ("abl-shared-s790" -> "abl-shared")."""
    runs = [read_run(f) for f in folders]
    header = ["routing iterations", "reconstruction", "transformation matrices", "after conv1", "epochs"]
    if not pooled:
        rows = [[r["name"], *_switches(r), f"{r['val_acc'] * 100:.2f}%" if r["val_acc"] is not None else "-",
                 _accuracy(r["test_acc"], r["test_errors"])] for r in runs]
        return markdown_table(["run", *header, "validation accuracy", "test accuracy (errors)"], rows)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["recipe"], *_switches(r)), []).append(r)
    rows = []
    for (_, *setting), group in groups.items():
        rows.append([re.sub(r"-s\d+$", "", group[0]["name"]), *setting, ", ".join(str(r["seed"]) for r in group),
                     _mean_std([r["val_acc"] for r in group if r["val_acc"] is not None]),
                     _mean_std([r["test_acc"] for r in group]), ", ".join(str(r["test_errors"]) for r in group)])
    return markdown_table(["runs", *header, "seeds", "validation accuracy", "test accuracy",
                           "test errors, per seed"], rows)


def _seed_list(seeds: list) -> str:
    """789, 790 -- or 789-793 for three or more in a row."""
    if len(seeds) >= 3 and all(isinstance(s, int) for s in seeds) and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def _last_val(r: dict) -> float | None:
    """Validation accuracy at the run's last epoch (what a recipe is judged by), None without a split."""
    return r["records"][-1].get("val_acc") if r["records"] else None


def paired_table(changes: list[dict], root: Path) -> str:
    """Changes set beside the same recipe without them, run for run on the same seeds: the final
    model's test errors and the last epoch's validation accuracy, with / without.

    changes: [{"change", "recipe", "with": [folders], "without": [folders], "outcome"}, ...] with
    folders relative to root (docs/results/tried.json). A pair whose seeds differ is an error."""
    rows = []
    for change in changes:
        fields = ("change", "recipe", "with", "without", "outcome")
        if (not isinstance(change, dict) or any(key not in change for key in fields)
                or not all(isinstance(change[side], list) and all(isinstance(f, str) for f in change[side])
                           for side in ("with", "without"))):
            raise CapsNetError(f"each change needs change, recipe, outcome, and with and without as lists of "
                               f"run folders: {change!r:.120}")
        label, recipe, outcome = change["change"], change["recipe"], change["outcome"]
        with_runs = [read_run(Path(root) / f) for f in change["with"]]
        without_runs = [read_run(Path(root) / f) for f in change["without"]]
        seeds = [r["seed"] for r in with_runs]
        if not seeds or seeds != [r["seed"] for r in without_runs]:
            raise CapsNetError(f"{label}: the runs with and without it must pair up seed for seed "
                               f"({seeds} against {[r['seed'] for r in without_runs]})")
        errors = [", ".join(str(r["final_test_errors"]) for r in runs) for runs in (with_runs, without_runs)]
        vals = [[_last_val(r) for r in runs] for runs in (with_runs, without_runs)]
        if any(v is None for side in vals for v in side):
            val = "-"
        else:
            val = " / ".join(", ".join(f"{v * 100:.2f}" for v in side) for side in vals) + "%"
        rows.append([label, recipe, _seed_list(seeds), " / ".join(errors), val, outcome])
    return markdown_table(["change", "recipe, epochs", "seeds", "test errors: with / without",
                           "validation: with / without", "outcome"], rows)


def training_curves(folders: list[Path], out: Path) -> Path:
    """A PNG of each run's curves: training loss, and validation (and, if logged, test) accuracy per epoch."""
    try:
        import matplotlib
    except ImportError:
        raise CapsNetError("drawing curves needs matplotlib: pip install 'capsnet[plots]'") from None
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from .files import atomic_write

    rows = [read_run(f) for f in folders]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for i, r in enumerate(rows):
        color = f"C{i}"
        epochs = [rec["epoch"] for rec in r["records"]]
        ax_loss.plot(epochs, [rec["train_loss"] for rec in r["records"]], color=color, marker=".", label=r["name"])
        val = [(rec["epoch"], rec["val_acc"] * 100) for rec in r["records"] if rec.get("val_acc") is not None]
        test = [(rec["epoch"], rec["test_acc"] * 100) for rec in r["records"] if rec.get("test_acc") is not None]
        if val:
            ax_acc.plot(*zip(*val), color=color, marker=".", label=f"{r['name']} validation")
        if test:
            ax_acc.plot(*zip(*test), color=color, marker=".", linestyle="--", label=f"{r['name']} test (not used)")
        chosen = "chosen on validation" if r["validated"] else "final model (no validation split)"
        ax_acc.plot([r["selected_epoch"]], [r["test_acc"] * 100], color=color, marker="*", markersize=11,
                    linestyle="none", label=f"{r['name']} test, {chosen}: {r['test_acc'] * 100:.2f}%")
        if r["final_test_acc"] is not None and r["selected_epoch"] != r["epochs"]:
            ax_acc.plot([r["epochs"]], [r["final_test_acc"] * 100], color=color, marker="D", markersize=6,
                        linestyle="none", label=f"{r['name']} test, final model: {r['final_test_acc'] * 100:.2f}%")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss (margin + reconstruction)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    accuracies = [v for line in ax_acc.get_lines() for v in line.get_ydata()]
    if accuracies:  # the last point of accuracy is what matters: show at most the top 1.2 points
        ax_acc.set_ylim(bottom=max(min(accuracies), max(accuracies) - 1.2) - 0.02, top=max(accuracies) + 0.05)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(out), buf.getvalue())
    return Path(out)


def _epochs_logged(folder: Path) -> str:
    """'3 of 50 epochs logged' for a run still in progress, as far as its files can be read."""
    try:
        epochs = json.loads((folder / "config.json").read_text())["train"]["epochs"]
        lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
    except (OSError, ValueError, KeyError, TypeError):
        return "its config.json or metrics.jsonl cannot be read"
    return f"{sum(1 for line in lines if line.strip())} of {epochs} epochs logged"


def finished_runs(root: Path) -> list[Path]:
    """Run folders under root that have a summary, sorted by name."""
    return sorted(p.parent for p in Path(root).glob("*/summary.json"))
