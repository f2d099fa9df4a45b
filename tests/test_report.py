import json
from pathlib import Path

import torch
from PIL import Image

from capsnet.cli import main
from capsnet.config import TrainConfig
from capsnet.report import finished_runs, read_run
from capsnet.train import fit, prepare_run_dir

from conftest import small_model_config, synthetic


def test_report_rebuilds_the_table_from_run_logs(tmp_path, capsys):
    data = synthetic()
    run = tmp_path / "results" / "tiny"
    prepare_run_dir(run, force=False)
    summary = fit(small_model_config(data), TrainConfig(epochs=2, batch_size=32, val_size=16, precision="fp32",
                                                        compile=False), data, run, torch.device("cpu"),
                  verbose=False, argv=["train", "-e", "2"])
    (run / "last.pt").unlink()  # docs/results keeps only the small files
    (run / "model.pt").unlink()
    row = read_run(run)
    assert row["test_acc"] == summary["test_acc"] and row["epochs"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["seconds"] == sum(r["seconds"] for r in records)
    assert finished_runs(tmp_path / "results") == [run]
    assert main(["report", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].startswith("| tiny | ")
    assert f"{summary['test_acc'] * 100:.2f}%" in out[2] and "`capsnet train -e 2`" in out[2]

    png = tmp_path / "curves.png"
    assert main(["report", "--results", str(tmp_path / "results"), "--ablation", "--curves", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("| tiny | 3 | yes | one per capsule | ReLU | 2 | ")
    image = Image.open(png)
    assert image.format == "PNG" and image.size[0] > image.size[1] > 200
    colors = image.convert("RGB").getcolors(1 << 20)
    assert len(colors) > 20  # lines and text were drawn, not a blank canvas


def test_report_of_the_committed_results():
    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    rows = [read_run(f) for f in finished_runs(results)]
    assert rows and all(0 < r["test_acc"] <= 1 for r in rows)


def test_report_without_runs_is_one_line(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
