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
    (run / "final.pt").unlink()
    row = read_run(run)
    assert row["test_acc"] == summary["test_acc"] and row["epochs"] == 2
    assert row["final_test_acc"] == summary["final_test_acc"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["seconds"] == sum(r["seconds"] for r in records)
    assert finished_runs(tmp_path / "results") == [run]
    assert main(["report", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[2].startswith("| tiny | ")
    assert f"{summary['test_acc'] * 100:.2f}% ({summary['test_errors']}) | " \
           f"{summary['final_test_acc'] * 100:.2f}% ({summary['final_test_errors']}) |" in out[2]
    assert "`capsnet train -e 2`" in out[2]

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


def test_report_of_a_run_still_training_says_how_far_it_got(tmp_path, capsys):
    run = tmp_path / "r1"
    _fake_run(run, 789, 0.99, None)
    (run / "summary.json").unlink()  # what a run directory holds between epochs
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"capsnet: error: {run}: training has not finished (2 of 2 epochs logged); " \
                  f"`capsnet train --resume {run}` continues it"
    (run / "metrics.jsonl").unlink()  # stopped before its first epoch ended
    assert main(["report", str(run)]) == 2
    assert "(0 of 2 epochs logged)" in capsys.readouterr().err


def _fake_run(folder: Path, seed: int, test_acc: float, final_acc: float | None, shared: bool = False,
              capsule_bias: bool | None = None, weight_init: float | None = None, init: str | None = None,
              fp32_routing: bool | None = None, **train):
    """The three small files of a finished 2-epoch run, as docs/results keeps them (capsule_bias,
    weight_init, init, fp32_routing None: a config.json from before those settings were recorded,
    without the key)."""
    folder.mkdir(parents=True)
    model = {"routing_iters": 3, "reconstruct": True, "shared_weights": shared, "leaky_relu": False}
    for key, value in (("capsule_bias", capsule_bias), ("weight_init", weight_init), ("init", init),
                       ("fp32_routing", fp32_routing)):
        if value is not None:
            model[key] = value
    config = {"device_name": "cpu", "precision": "bf16", "argv": ["train", "-s", str(seed)],
              "train": {"recipe": "default", "seed": seed, "epochs": 2, "batch_size": 64, **train}, "model": model}
    (folder / "config.json").write_text(json.dumps(config))
    records = [{"epoch": e, "train_loss": 0.1, "val_acc": 0.99, "img_s": 100.0, "seconds": 1.0} for e in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"test_acc": test_acc, "test_errors": round((1 - test_acc) * 10000), "test_images": 10000,
               "selected_epoch": 1, "val_acc": 0.99}
    if final_acc is not None:
        summary.update(final_epoch=2, final_test_acc=final_acc, final_test_errors=round((1 - final_acc) * 10000))
    (folder / "summary.json").write_text(json.dumps(summary))


def test_seeds_are_pooled_per_recipe_and_architecture(tmp_path, capsys):
    _fake_run(tmp_path / "a", 1, 0.9960, 0.9964)
    _fake_run(tmp_path / "b", 2, 0.9957, 0.9968)
    _fake_run(tmp_path / "c", 3, 0.9963, None)
    _fake_run(tmp_path / "d", 1, 0.9890, 0.9900, shared=True)
    _fake_run(tmp_path / "e", 1, 0.9970, 0.9970, capsule_bias=True)
    _fake_run(tmp_path / "f", 4, 0.9956, 0.9960, capsule_bias=False, weight_init=0.05)  # pooled with a-c
    _fake_run(tmp_path / "g", 1, 0.9950, 0.9950, capsule_bias=True, weight_init=0.15, init="authors",
              fp32_routing=True)
    assert main(["report", "--seeds", *(str(tmp_path / n) for n in "abcdefg")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6
    # mean 99.60, sample std of (99.60, 99.57, 99.63) = 0.03; final over the two runs that have one
    assert out[2] == ("| default | paper | 2 | 64, bf16 | cpu | 1, 2, 3, 4 | 99.59 +- 0.03% (n=4) | "
                      "99.64 +- 0.04% (n=3) |")
    assert out[3] == "| default | shared matrices | 2 | 64, bf16 | cpu | 1 | 98.90% (n=1) | 99.00% (n=1) |"
    assert out[4] == "| default | capsule bias | 2 | 64, bf16 | cpu | 1 | 99.70% (n=1) | 99.70% (n=1) |"
    assert out[5] == ("| default | capsule bias, float32 routing, matrices from +-0.15, authors init | 2 | 64, bf16 | cpu | 1 | "
                      "99.50% (n=1) | 99.50% (n=1) |")


def test_the_architecture_column_counts_routing_iterations_in_words(tmp_path, capsys):
    for name, iters in (("a", 1), ("b", 2)):
        _fake_run(tmp_path / name, 1, 0.9960, 0.9960)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["model"]["routing_iters"] = iters
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert main(["report", "--seeds", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    columns = [line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert columns == ["1 routing iteration", "2 routing iterations"]


def test_runs_whose_flags_changed_the_recipe_are_pooled_apart(tmp_path, capsys):
    _fake_run(tmp_path / "a", 1, 0.9960, 0.9964, lr=1e-3, max_rotation=0.0)  # the recipe's own values
    _fake_run(tmp_path / "b", 1, 0.9970, 0.9970, lr=1e-3, max_rotation=10.0, max_scale=0.1)
    _fake_run(tmp_path / "c", 2, 0.9950, 0.9950, lr=2e-3, ema_decay=0.0, test_every_epoch=True)
    assert main(["report", "--seeds", *(str(tmp_path / n) for n in "abc")]) == 0
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["| default", "| default + max_rotation 10, max_scale 0.1", "| default + lr 0.002, ema_decay 0"]


def test_a_run_that_logged_test_accuracy_reports_its_final_model(tmp_path):
    _fake_run(tmp_path / "a", 1, 0.9960, None)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    last = {**json.loads(lines[-1]), "test_acc": 0.9967}
    (tmp_path / "a" / "metrics.jsonl").write_text(lines[0] + "\n" + json.dumps(last) + "\n")
    row = read_run(tmp_path / "a")
    assert (row["final_test_acc"], row["final_test_errors"]) == (0.9967, 33)


def test_a_run_without_validation_split_reports_no_validation_choice(tmp_path, capsys):
    _fake_run(tmp_path / "a", 1, 0.9960, 0.9960, val_size=0)
    _fake_run(tmp_path / "b", 2, 0.9970, 0.9970, val_size=0)
    assert read_run(tmp_path / "a")["validated"] is False
    assert main(["report", "--seeds", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row == ("| default + val_size 0 (all training images, no validation) | paper | 2 | 64, bf16 | cpu | 1, 2 "
                   "| - | 99.65 +- 0.07% (n=2) |")
    assert main(["report", str(tmp_path / "a")]) == 0
    assert "| a | - (no validation split) | 99.60% (40) |" in capsys.readouterr().out


def test_ablation_pools_the_seeds_of_each_switch_setting(tmp_path, capsys):
    _fake_run(tmp_path / "abl-r3", 789, 0.9930, None)
    _fake_run(tmp_path / "abl-shared", 789, 0.9890, None, shared=True)
    _fake_run(tmp_path / "abl-r3-s790", 790, 0.9926, None)
    _fake_run(tmp_path / "abl-shared-s790", 790, 0.9880, None, shared=True)
    folders = [str(tmp_path / n) for n in ("abl-r3", "abl-shared", "abl-r3-s790", "abl-shared-s790")]
    assert main(["report", "--ablation", "--seeds", *folders]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4  # header, separator, one row per switch setting
    # sample std of (99.30, 99.26) = 0.028; errors listed per seed in the runs' order
    assert out[2] == "| abl-r3 | 3 | yes | one per capsule | ReLU | 2 | 789, 790 | 99.00 +- 0.00% (n=2) | " \
                     "99.28 +- 0.03% (n=2) | 70, 74 |"
    assert out[3].startswith("| abl-shared | 3 | yes | shared per type | ReLU | 2 | 789, 790 | ")
    assert out[3].endswith("| 98.85 +- 0.07% (n=2) | 110, 120 |")
    assert main(["report", "--ablation", *folders]) == 0  # without --seeds: a row per run
    assert len(capsys.readouterr().out.splitlines()) == 6


def _set_last_val(folder: Path, val_acc: float | None) -> None:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text(lines[0] + "\n" + json.dumps({**json.loads(lines[-1]), "val_acc": val_acc}) + "\n")


def test_paired_table_sets_each_change_beside_its_twins_seed_for_seed(tmp_path, capsys):
    for seed, (final_with, final_without, val_with, val_without) in zip(
            (789, 790, 791), ((0.9963, 0.9958, 0.9966, 0.9972), (0.9961, 0.9962, 0.9958, 0.9952),
                              (0.9958, 0.9956, 0.9950, 0.9954))):
        _fake_run(tmp_path / f"r32-s{seed}", seed, 0.9950, final_with, fp32_routing=True)
        _fake_run(tmp_path / f"base-s{seed}", seed, 0.9950, final_without)
        _set_last_val(tmp_path / f"r32-s{seed}", val_with)
        _set_last_val(tmp_path / f"base-s{seed}", val_without)
    _fake_run(tmp_path / "val0-s789", 789, 0.9968, 0.9968, val_size=0)
    _set_last_val(tmp_path / "val0-s789", None)
    changes = [{"change": "`--fp32-routing`", "recipe": "fast, 9", "outcome": "fewer errors",
                "with": [f"r32-s{s}" for s in (789, 790, 791)], "without": [f"base-s{s}" for s in (789, 790, 791)]},
               {"change": "`--val 0`", "recipe": "default, 2", "outcome": "level",
                "with": ["val0-s789"], "without": ["base-s789"]}]
    spec = tmp_path / "tried.json"
    spec.write_text(json.dumps(changes))
    assert main(["report", "--results", str(tmp_path), "--paired", str(spec)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    # the final models' errors (not the validation-chosen ones'), and validation at the last epoch
    assert out[2] == ("| `--fp32-routing` | fast, 9 | 789-791 | 37, 39, 42 / 42, 38, 44 | "
                      "99.66, 99.58, 99.50 / 99.72, 99.52, 99.54% | fewer errors |")
    assert out[3] == "| `--val 0` | default, 2 | 789 | 32 / 42 | - | level |"


def test_paired_table_refuses_runs_that_do_not_pair_up(tmp_path, capsys):
    _fake_run(tmp_path / "a-s1", 1, 0.9950, 0.9950)
    _fake_run(tmp_path / "b-s2", 2, 0.9950, 0.9950)
    spec = tmp_path / "tried.json"
    spec.write_text(json.dumps([{"change": "x", "recipe": "r", "outcome": "o", "with": ["a-s1"], "without": ["b-s2"]}]))
    assert main(["report", "--results", str(tmp_path), "--paired", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x: the runs with and without it must pair up seed for seed ([1] against [2])" in err[0]
    for content in (b"[{", bytes([0x89, 0x50, 0x4E, 0x47, 0xFF, 0xFE])):  # cut short; not text at all (a PNG)
        spec.write_bytes(content)
        assert main(["report", "--results", str(tmp_path), "--paired", str(spec)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "tried.json: not JSON" in err[0]
    (tmp_path / "b-s2" / "summary.json").write_bytes(bytes([0xFF, 0xFE, 0x00]))  # a damaged run
    assert main(["report", str(tmp_path / "b-s2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b-s2: not a finished run directory" in err[0]


def test_a_data_set_s_own_settings_are_not_listed_as_changes():
    from capsnet.config import TrainConfig, recipe_config, to_dict
    from capsnet.report import recipe_label

    multi = to_dict(recipe_config("fast", dataset="multimnist"))
    assert recipe_label(multi) == "fast + dataset multimnist"
    assert recipe_label({**multi, "lr": 2e-3}) == "fast + dataset multimnist, lr 0.002"
    assert recipe_label(to_dict(TrainConfig(recipe="fast", lr=2e-3, epochs=9))) == "fast"


def test_well_formed_json_that_is_not_a_run_log_is_refused_in_one_line(tmp_path, capsys):
    """Hand-edited or foreign logs: valid JSON of the wrong shape names its file and entry."""
    edits = {  # file: (what it holds instead, what the one line names)
        "config-list": ("config.json", lambda c: [], "config.json: not a JSON object"),
        "train-list": ("config.json", lambda c: {**c, "train": [1]}, "'train' is not an object"),
        "recipe-list": ("config.json", lambda c: {**c, "train": {**c["train"], "recipe": ["x"]}}, "train.recipe is"),
        "argv-numbers": ("config.json", lambda c: {**c, "argv": [1, 2]}, "'argv' is not a list of words"),
        "commit-number": ("config.json", lambda c: {**c, "git_commit": 12345}, "'git_commit' is not text"),
        "summary-empty": ("summary.json", lambda s: {}, "'test_acc' is missing or not a number"),
        "accuracy-text": ("summary.json", lambda s: {**s, "test_acc": "high"}, "'test_acc' is missing or not"),
        "wall-text": ("summary.json", lambda s: {**s, "wall_seconds": "x"}, "'wall_seconds' is not a number"),
        "record-short": ("metrics.jsonl", lambda r: [{"epoch": 1}], "line 1: 'seconds' is missing"),
        "record-number": ("metrics.jsonl", lambda r: [5], "line 1 is not a JSON object"),
        "record-nan": ("metrics.jsonl", lambda r: [{**r[0], "val_acc": float("nan")}], "line 1: 'val_acc' is not"),
    }
    for name, (file, edit, needle) in edits.items():
        run = tmp_path / name
        _fake_run(run, 789, 0.99, 0.99)
        if file == "metrics.jsonl":
            records = [json.loads(line) for line in (run / file).read_text().splitlines()]
            (run / file).write_text("".join(json.dumps(r) + "\n" for r in edit(records)))
        else:
            (run / file).write_text(json.dumps(edit(json.loads((run / file).read_text()))))
        for flags in ([], ["--seeds"]):
            assert main(["report", *flags, str(run)]) == 2, name
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{run / file}: " in err[0] and needle in err[0], (name, err)
    spec = tmp_path / "tried.json"  # a pair whose sides are not lists is named, not walked letter by letter
    _fake_run(tmp_path / "a-s1", 1, 0.9950, 0.9950)
    spec.write_text(json.dumps([{"change": "x", "recipe": "r", "outcome": "o", "with": "a-s1", "without": ["a-s1"]}]))
    assert main(["report", "--results", str(tmp_path), "--paired", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with and without as lists of run folders" in err[0]
