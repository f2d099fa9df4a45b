"""Tables from run directories: the README's results table is rebuilt from the logged runs.

Each run directory (as `capsnet train` writes it, or its small files copied under
docs/results/) holds config.json, metrics.jsonl and summary.json; nothing else is read.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CapsNetError


def read_run(folder: Path) -> dict:
    """One row: what ran, where, how long, and the selected model's test accuracy."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise CapsNetError(f"{folder}: not a finished run directory ({exc})") from None
    train = config.get("train", {})
    return {
        "name": folder.name,
        "test_acc": summary["test_acc"],
        "test_errors": summary["test_errors"],
        "epochs": len(records),
        "selected_epoch": summary.get("selected_epoch"),
        "seconds": sum(r["seconds"] for r in records),
        "img_s": sum(r["img_s"] for r in records) / len(records) if records else 0.0,
        "precision": config.get("precision"),
        "batch": train.get("batch_size"),
        "device": config.get("device_name"),
        "command": "capsnet " + " ".join(config.get("argv") or []),
        "commit": (config.get("git_commit") or "")[:7],
    }


def results_table(folders: list[Path]) -> str:
    """A markdown table, one row per finished run, in the order given."""
    rows = [read_run(f) for f in folders]
    lines = ["| run | test accuracy (errors) | epochs (selected) | training time | train img/s | precision, batch | "
             "machine | command | commit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        minutes = r["seconds"] / 60
        lines.append(f"| {r['name']} | {r['test_acc'] * 100:.2f}% ({r['test_errors']}) | {r['epochs']} "
                     f"({r['selected_epoch']}) | {minutes:.1f} min | {r['img_s']:.0f} | {r['precision']}, "
                     f"{r['batch']} | {r['device']} | `{r['command']}` | {r['commit']} |")
    return "\n".join(lines)


def finished_runs(root: Path) -> list[Path]:
    """Run folders under root that have a summary, sorted by name."""
    return sorted(p.parent for p in Path(root).glob("*/summary.json"))
