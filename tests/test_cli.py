"""The command line: one successful run end to end, and one line for each kind of bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from capsnet.cli import errors_in, main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("capsnet: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist):
    """One real, very short training run through the CLI, shared by the tests below."""
    run = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "-e", "1", "--limit", "320", "--val", "64", "-b", "64", "--shift", "1", "--save", str(run),
                 "--visualize", "-q", "--device", "cpu"])
    assert code == 0
    return run


def test_train_writes_a_complete_run_directory(trained_run):
    for name in ("config.json", "metrics.jsonl", "last.pt", "model.pt", "final.pt", "summary.json"):
        assert (trained_run / name).is_file(), name
    assert json.loads((trained_run / "config.json").read_text())["train"]["max_shift"] == 1


def test_visualize_writes_the_seed_layout_and_the_errors(trained_run, mnist, capsys):
    out = trained_run / "pictures"
    code, stdout, _ = run_cli(capsys, "visualize", "--load", str(trained_run), "--out", str(out), "--device", "cpu")
    assert code == 0
    names = ["vis.png", "vis_all.png", "vis_errors.png"] + [f"vis_tweaked{k}.png" for k in range(10)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    tile = 32  # 31 px tile + 1 px line
    assert Image.open(out / "vis.png").size == (20 * tile + 1, 2 * tile + 1)
    assert Image.open(out / "vis_all.png").size == (20 * tile + 1, 11 * tile + 1)
    for k in range(10):
        assert Image.open(out / f"vis_tweaked{k}.png").size == (16 * tile + 1, 9 * tile + 1)
    # the top row of vis_all is green (real digits), the rows below blue (reconstructions)
    pixels = Image.open(out / "vis_all.png").convert("RGB")
    r, g, b = pixels.getpixel((3, 3))
    assert g > b and g > r
    r, g, b = pixels.getpixel((3, tile + 3))
    assert b > g > r
    # vis_errors: blocks of up to 20 wrong test digits (a caption row, the digit, two reconstructions)
    from capsnet.checkpoint import load_model
    from capsnet.viz import ERROR_COLUMNS, MAX_ERRORS, misclassified

    summary = json.loads((trained_run / "summary.json").read_text())
    wrong, predicted = misclassified(load_model(trained_run), mnist.test_images, mnist.test_labels,
                                     summary["precision"])
    assert len(wrong) == summary["test_errors"] > 0  # the errors `evaluate` counts, one by one
    assert (predicted != mnist.test_labels[wrong]).all()
    drawn = min(len(wrong), MAX_ERRORS)
    assert Image.open(out / "vis_errors.png").size == (min(drawn, ERROR_COLUMNS) * tile + 1,
                                                      math.ceil(drawn / ERROR_COLUMNS) * 4 * tile + 1)
    assert (trained_run / "vis_all.png").is_file()  # --visualize put them in the run directory too


def test_evaluate_reproduces_the_logged_test_accuracy(trained_run, capsys):
    summary = json.loads((trained_run / "summary.json").read_text())
    code, out, _ = run_cli(capsys, "evaluate", "--load", str(trained_run), "--device", "cpu")
    assert code == 0
    assert f"{summary['test_acc'] * 100:.2f}%" in out and f"({summary['test_errors']} errors" in out
    code, out, _ = run_cli(capsys, "evaluate", "--load", str(trained_run / "final.pt"), "--device", "cpu")
    assert code == 0
    assert f"{summary['final_test_acc'] * 100:.2f}%" in out and f"({summary['final_test_errors']} errors" in out


def test_evaluate_on_the_validation_split_reproduces_the_logged_figures(trained_run, mnist, tmp_path, capsys):
    summary = json.loads((trained_run / "summary.json").read_text())
    last = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    for load, val_acc in ((trained_run, summary["val_acc"]), (trained_run / "final.pt", last["val_acc"])):
        code, out, _ = run_cli(capsys, "evaluate", "--load", str(load), "--split", "val", "--device", "cpu")
        assert code == 0
        assert out.startswith(f"validation accuracy {val_acc * 100:.2f}% ({errors_in(round((1 - val_acc) * 64), 64)})")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.pt").write_bytes((trained_run / "model.pt").read_bytes())
    code, _, err = run_cli(capsys, "evaluate", "--load", str(alone / "model.pt"), "--split", "val")
    assert_one_line_error(code, err, "no config.json", "validation images are unknown")
    # which images: the last val_size of the first `limit`, one image told apart by the model's answer
    from capsnet.checkpoint import load_model
    from capsnet.train import predict

    correct = predict(load_model(trained_run), mnist.train_images[:400], 500, summary["precision"]) \
        == mnist.train_labels[:400]
    assert correct[1:].any() and not correct[1:].all()
    config = json.loads((trained_run / "config.json").read_text())
    for index, expected in ((1 + int(correct[1:].nonzero()[0]), "100.00% (0 errors in 1)"),  # index 0 would
                            (1 + int((~correct[1:]).nonzero()[0]), "0.00% (1 error in 1)")):  # leave no training
        config["train"].update(limit=index + 1, val_size=1)
        (alone / "config.json").write_text(json.dumps(config))
        code, out, _ = run_cli(capsys, "evaluate", "--load", str(alone), "--split", "val", "--device", "cpu")
        assert code == 0 and out.startswith(f"validation accuracy {expected}")
    config["train"]["val_size"] = 0
    (alone / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "evaluate", "--load", str(alone), "--split", "val")
    assert_one_line_error(code, err, "held out no validation images")
    for damaged in ("{not json", '{"train": null}', '{"train": {"val_size": Infinity}}'):
        (alone / "config.json").write_text(damaged)
        code, _, err = run_cli(capsys, "evaluate", "--load", str(alone), "--split", "val")
        assert_one_line_error(code, err, "config.json: cannot read the run's validation split")


def test_evaluate_and_visualize_use_the_data_set_the_model_trained_on(trained_run, mnist, tmp_path, monkeypatch,
                                                                       capsys):
    import capsnet.data
    from capsnet.checkpoint import load_model_and_dataset

    for load in (trained_run, trained_run / "final.pt", trained_run / "last.pt"):  # each says what it learned from
        assert load_model_and_dataset(load)[1] == "mnist"
    asked = []
    few = capsnet.data.Dataset("mnist", mnist.train_images[:10], mnist.train_labels[:10], mnist.test_images[:200],
                               mnist.test_labels[:200], 10)

    def record(name, data_dir, log):  # serve a little MNIST whatever is asked: only the name matters here
        asked.append(name)
        return few

    monkeypatch.setattr(capsnet.data, "load_dataset", record)
    alone = tmp_path / "alone"
    alone.mkdir()
    ckpt = torch.load(trained_run / "model.pt", weights_only=True)
    config = json.loads((trained_run / "config.json").read_text())
    # (what model.pt says, what config.json says, flags) -> the data set used; None: no such entry or file
    for in_model, in_config, flags, expected in (("fashion-mnist", None, [], "fashion-mnist"),
                                                 ("fashion-mnist", "mnist", [], "fashion-mnist"),
                                                 ("fashion-mnist", None, ["--dataset", "mnist"], "mnist"),
                                                 (None, "fashion-mnist", [], "fashion-mnist"),  # older checkpoints
                                                 (None, None, [], "mnist")):
        ckpt.pop("dataset", None)
        ckpt.update({"dataset": in_model} if in_model else {})
        torch.save(ckpt, alone / "model.pt")
        (alone / "config.json").unlink(missing_ok=True)
        if in_config:
            config["train"]["dataset"] = in_config
            (alone / "config.json").write_text(json.dumps(config))
        code, out, err = run_cli(capsys, "evaluate", "--load", str(alone), "--device", "cpu", *flags)
        assert code == 0, err
        assert asked.pop() == expected
        assert out.startswith("test accuracy on fashion-mnist " if expected == "fashion-mnist" else "test accuracy 1")
        code, _, err = run_cli(capsys, "visualize", "--load", str(alone), "--out", str(tmp_path / "pictures"),
                               "--device", "cpu", *flags)
        assert code == 0 and asked.pop() == expected, err
    # --per-class: one line per class, in that data set's names, adding up to the first line's count
    code, out, err = run_cli(capsys, "evaluate", "--load", str(alone), "--device", "cpu", "--per-class",
                             "--dataset", "fashion-mnist")
    assert code == 0 and asked.pop() == "fashion-mnist", err
    head, *rows = out.strip().splitlines()
    assert [row.split()[0] for row in rows] == ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                                                "shirt", "sneaker", "bag", "ankle"]
    right = [int(row.split("%")[1].split()[0]) for row in rows]
    of = [int(row.split(" of ")[1].split(";")[0]) for row in rows]
    assert of == torch.bincount(few.test_labels, minlength=10).tolist()
    assert f"({errors_in(200 - sum(right), 200)})" in head
    ckpt["dataset"] = "cifar10"
    torch.save(ckpt, alone / "model.pt")
    code, _, err = run_cli(capsys, "evaluate", "--load", str(alone / "model.pt"))
    assert_one_line_error(code, err, "model.pt: the model was trained on 'cifar10', which this version does not know")
    del ckpt["dataset"]
    torch.save(ckpt, alone / "model.pt")
    (alone / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "evaluate", "--load", str(alone))
    assert_one_line_error(code, err, "config.json: cannot read the run's data set (--dataset names it)")
    assert asked == []  # neither error fetched any data


def test_visualize_refuses_a_bad_precision_before_drawing_anything(trained_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "visualize", "--load", str(trained_run), "--out", str(tmp_path / "pics"),
                           "--precision", "bogus", "--device", "cpu")
    assert_one_line_error(code, err, "unknown precision 'bogus'")
    assert not (tmp_path / "pics").exists() or not any((tmp_path / "pics").iterdir())


def test_visualize_without_a_decoder_is_refused_before_training(tmp_path, capsys):
    run = tmp_path / "norecon"
    code, _, err = run_cli(capsys, "train", "-e", "1", "--limit", "320", "--val", "64", "--no-reconstruct",
                           "--visualize", "--save", str(run), "--device", "cpu", "-q")
    assert_one_line_error(code, err, "--visualize draws with the decoder", "--no-reconstruct")
    assert not (run / "metrics.jsonl").exists() and not (run / "last.pt").exists()


def test_evaluate_routes_as_many_times_as_told(trained_run, mnist, capsys):
    from capsnet.checkpoint import load_model
    from capsnet.config import TrainConfig
    from capsnet.runtime import resolve_precision
    from capsnet.train import evaluate, to_input

    summary = json.loads((trained_run / "summary.json").read_text())
    code, out, _ = run_cli(capsys, "evaluate", "--load", str(trained_run), "--device", "cpu", "--routing-iters", "3")
    assert code == 0 and f"({summary['test_errors']} errors" in out and "3 routing iterations (trained with 3)" in out
    model = load_model(trained_run)
    x = to_input(mnist.test_images[:64], torch.device("cpu"))
    with torch.no_grad():
        three = model(x, reconstruct=False).lengths
        model.digits.routing_iters = 1
        one = model(x, reconstruct=False).lengths
    assert not torch.allclose(one, three, atol=1e-3)  # the count reaches the layer
    ok, n = evaluate(model, mnist.test_images, mnist.test_labels, TrainConfig(eval_batch_size=500),
                     resolve_precision("auto", torch.device("cpu")))
    code, out, _ = run_cli(capsys, "evaluate", "--load", str(trained_run), "--device", "cpu", "--routing-iters", "1")
    assert code == 0 and f"({errors_in(n - ok, n)})" in out and "1 routing iteration (trained with 3)" in out
    code, _, err = run_cli(capsys, "evaluate", "--load", str(trained_run), "--routing-iters", "0")
    assert_one_line_error(code, err, "--routing-iters", "must be positive")


def test_refuses_to_overwrite_a_run(trained_run, capsys):
    before = (trained_run / "model.pt").read_bytes()
    code, _, err = run_cli(capsys, "train", "-e", "1", "--save", str(trained_run))
    assert_one_line_error(code, err, "already holds a run", "--resume")
    assert (trained_run / "model.pt").read_bytes() == before


def test_force_keeps_the_old_run_until_the_new_one_can_start(trained_run, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "metrics.jsonl", "last.pt", "model.pt", "final.pt", "summary.json"):
        (old / name).write_bytes((trained_run / name).read_bytes())
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    damaged = tmp_path / "data" / "mnist"
    damaged.mkdir(parents=True)
    (damaged / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 100)
    for flags, needle in ((["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
                          (["--data-dir", str(damaged.parent)], "train-images-idx3-ubyte: truncated"),
                          (["--precision", "fp16"], "unknown precision 'fp16'"),
                          (["--val", "70000"], "--val 70000 must be between")):
        code, _, err = run_cli(capsys, "train", "-e", "1", "--save", str(old), "--force", "--device", "cpu", *flags)
        assert_one_line_error(code, err, needle)
        assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_resume_cannot_end_a_run_before_where_it_stopped(trained_run, tmp_path, capsys):
    from capsnet.checkpoint import load_checkpoint
    from capsnet.files import atomic_torch_save

    run = tmp_path / "exp"
    run.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    state = load_checkpoint(trained_run / "last.pt")
    state["epoch"] = 2  # as if it had trained two epochs of an exp schedule, whose length may change
    state["train_config"]["schedule"] = "exp"
    atomic_torch_save(state, run / "last.pt")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "-e", "1")
    assert_one_line_error(code, err, "has trained 2 epochs already", "-e 1")


def test_a_damaged_training_state_is_refused_in_one_line_and_the_run_kept(trained_run, tmp_path, capsys):
    from capsnet.checkpoint import load_checkpoint
    from capsnet.files import atomic_torch_save

    good = load_checkpoint(trained_run / "last.pt")
    damages = {  # what a hand-edited or foreign last.pt might hold, and what the one line must name
        "no train_config": (lambda s: s.pop("train_config"), "'train_config' is missing"),
        "settings a string": (lambda s: s.update(train_config="fast"), "'train_config' is missing or not a mapping"),
        "no optimizer": (lambda s: s.pop("optimizer"), "'optimizer' is missing"),
        "no average": (lambda s: s.pop("average"), "no average is saved"),
        "epoch as text": (lambda s: s.update(epoch="1"), "'epoch' is missing or not a whole number"),
        "zero epochs": (lambda s: s["train_config"].update(epochs=0), "epochs must be at least 1"),
        "lr as text": (lambda s: s["train_config"].update(lr="fast"), "its settings"),
        "other width": (lambda s: s["model_config"].update(conv_channels=128), "size mismatch for conv1"),
        "float rng": (lambda s: s.update(rng_cpu=torch.zeros(3)), "random state"),
        "version as text": (lambda s: s.update(version="x"), "format version is 'x', not a number"),
    }
    for case, (damage, needle) in damages.items():
        run = tmp_path / case.replace(" ", "-")
        run.mkdir()
        for name in ("config.json", "metrics.jsonl"):
            (run / name).write_bytes((trained_run / name).read_bytes())
        state = load_checkpoint(trained_run / "last.pt")
        damage(state)
        atomic_torch_save(state, run / "last.pt")
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        code, _, err = run_cli(capsys, "train", "--resume", str(run), "--device", "cpu", "-q")
        assert_one_line_error(code, err, "last.pt", needle)
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before, case
    assert load_checkpoint(trained_run / "last.pt")["epoch"] == good["epoch"] == 1  # (damages made to copies)


def test_a_run_that_saved_no_epoch_says_how_to_start_again(trained_run, tmp_path, capsys):
    run = tmp_path / "cut"  # as Ctrl-C in the first epoch leaves it
    run.mkdir()
    (run / "config.json").write_bytes((trained_run / "config.json").read_bytes())
    (run / "metrics.jsonl").write_bytes(b"")
    code, _, err = run_cli(capsys, "train", "--resume", str(run))
    assert_one_line_error(code, err, "stopped before its first epoch ended", f"--save {run} --force")
    code, _, err = run_cli(capsys, "train", "-e", "1", "--save", str(run))
    assert_one_line_error(code, err, "already holds a run that saved no epoch", "--force")
    assert "--resume" not in err
    code, _, err = run_cli(capsys, "train", "--resume", str(trained_run / "last.pt"))
    assert_one_line_error(code, err, "--resume takes the run's folder")
    logged = tmp_path / "logged"  # epochs logged, last.pt gone (deleted to save space): no --force advice
    logged.mkdir()
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        (logged / name).write_bytes((trained_run / name).read_bytes())
    code, _, err = run_cli(capsys, "train", "--resume", str(logged))
    assert_one_line_error(code, err, "last.pt: no such checkpoint, so the run cannot continue")
    assert "--force" not in err
    code, _, err = run_cli(capsys, "train", "-e", "1", "--save", str(logged))
    assert_one_line_error(code, err, "with no last.pt to continue from; use --force to start over")
    before = {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}
    code, out, err = run_cli(capsys, "train", "--resume", str(trained_run), "--device", "cpu")  # finished, tested
    assert code == 0 and err == ""
    assert out == f"{trained_run}: finished its 1 epoch and was tested already; nothing to train " \
                  f"(`capsnet evaluate --load {trained_run}` tests it again)\n"
    assert {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()} == before  # nothing rewritten


def test_resume_with_another_architecture_is_refused(trained_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", str(trained_run), "--shared-weights", "-e", "2")
    assert_one_line_error(code, err, "shared_weights=False", "--shared-weights")


def test_resume_cannot_add_a_capsule_bias(trained_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", str(trained_run), "--capsule-bias")
    assert_one_line_error(code, err, "capsule_bias=False", "--capsule-bias")


def test_resume_cannot_switch_the_routing_to_float32(trained_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", str(trained_run), "--fp32-routing")
    assert_one_line_error(code, err, "fp32_routing=False", "--[no-]fp32-routing asks for True")


def test_capsule_bias_is_trained_saved_and_evaluated(tmp_path, mnist, capsys):
    from capsnet.checkpoint import load_model

    run = tmp_path / "biased"
    code, _, _ = run_cli(capsys, "train", "-e", "1", "--limit", "192", "--val", "64", "-b", "64", "--capsule-bias",
                         "--recon-weight", "0.001", "--init", "authors", "--erase", "6", "--clean-epochs", "1", "--fp32-routing",
                         "--elastic", "20", "--elastic-sigma", "5", "--save", str(run), "-q",
                         "--device", "cpu")
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["capsule_bias"] is True and config["model"]["init"] == "authors"
    assert config["model"]["fp32_routing"] is True
    assert config["train"]["recon_weight"] == 0.001 and config["train"]["erase"] == 6
    assert config["train"]["clean_epochs"] == 1
    assert config["train"]["elastic"] == 20.0 and config["train"]["elastic_sigma"] == 5.0
    bias = load_model(run / "final.pt").digits.bias
    assert bias.shape == (10, 16) and not torch.allclose(bias, torch.full_like(bias, 0.1))  # trained from 0.1
    summary = json.loads((run / "summary.json").read_text())
    code, out, _ = run_cli(capsys, "evaluate", "--load", str(run / "final.pt"), "--device", "cpu")
    assert code == 0 and f"({summary['final_test_errors']} errors" in out


@pytest.mark.parametrize("flags,expected", [([], True), (["--no-fp32-routing"], False)])
def test_the_fast_recipe_routes_in_float32_unless_told_not_to(tmp_path, mnist, capsys, flags, expected):
    run = tmp_path / "fast"
    code, _, _ = run_cli(capsys, "train", "--recipe", "fast", "-e", "1", "--limit", "128", "--val", "64", "-b", "64",
                         *flags, "--save", str(run), "-q", "--device", "cpu")
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["recipe"] == "fast" and config["model"]["fp32_routing"] is expected


def test_resume_keeps_a_cosine_schedule_s_length(trained_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", str(trained_run), "-e", "3")
    assert_one_line_error(code, err, "epochs=1", "resuming with 3")


def test_resume_refuses_another_recipe(trained_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", str(trained_run), "--recipe", "fast")
    assert_one_line_error(code, err, "--recipe default", "--recipe fast")


@pytest.mark.parametrize("argv,needle", [
    (["train", "--recipe", "slow"], "invalid choice: 'slow'"),
    (["train", "--ema", "1.5"], "ema: must be in [0, 1)"),
    (["train", "--schedule", "linear"], "invalid choice: 'linear'"),
    (["train", "--rotate", "200"], "rotate: must be between 0 and 180 degrees"),
    (["train", "--scale", "1.5"], "scale: must be in [0, 1)"),
    (["train", "--erase", "-2"], "erase: must be 0 or more"),
    (["train", "--clean-epochs", "-1"], "clean-epochs: must be 0 or more"),
    (["train", "--elastic", "-1"], "elastic: must be 0 or more"),
    (["train", "--elastic", "nan"], "elastic: must be 0 or more"),
    (["train", "--elastic-sigma", "0"], "elastic-sigma: must be positive"),
    (["train", "-b", "0"], "batchsize: must be positive"),
    (["train", "-b", "-5"], "batchsize: must be positive"),
    (["train", "-e", "-1"], "epoch: must be positive"),
    (["train", "-e", "0"], "epoch: must be positive"),
    (["train", "--lr", "-1"], "lr: must be positive"),
    (["train", "--lr", "0"], "lr: must be positive"),
    (["train", "--recon-weight", "-1"], "recon-weight: must be positive"),
    (["train", "--init", "random"], "invalid choice: 'random'"),
    (["train", "-d", "-1"], "decay: must be in (0, 1]"),
    (["train", "-d", "1.5"], "decay: must be in (0, 1]"),
    (["train", "--device", "tpu", "-e", "1"], "unknown device 'tpu'"),
    (["evaluate", "--load", "/nonexistent/run"], "/nonexistent/run: no such run directory"),
    (["train", "--resume", "/nonexistent/run"], "/nonexistent/run: no such run directory"),
    (["visualize", "--load", "/nonexistent/run"], "no such run directory"),
    (["data", "--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["train", "--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["train", "-e", "ten"], "epoch: invalid whole number value: 'ten'"),
    (["train", "--lr", "fast"], "lr: invalid number value: 'fast'"),
    (["train", "--rotate", "much"], "rotate: invalid number value: 'much'"),
    (["evaluate", "--load", "/nonexistent/run", "--routing-iters", "two"], "routing-iters: invalid whole number"),
    (["train", "--lr", "inf"], "lr: must be a finite number"),
    (["train", "-s", "99999999999999"], "seed: must be between 0 and 4294967295"),
    (["train", "-s", "-1"], "seed: must be between 0 and 4294967295"),
    (["train", "--save", ""], "save: must name a file or folder, got an empty path"),
    (["evaluate", "--load", " "], "load: must name a file or folder, got an empty path"),
    (["train", "--resume", "/nonexistent/run", "--force"], "--force starts a run over and --resume continues one"),
    (["train", "-e", "1", "--shift", "14"], "--shift 14 could move what its 28x28 images show out of them; give 0 to 13 px"),
    (["train", "-e", "1", "--erase", "29"], "--erase 29 is wider than its 28x28 images"),
    (["train", "--elastic", "inf"], "elastic: must be a finite number"),
    (["train", "--elastic-sigma", "inf"], "elastic-sigma: must be a finite number"),
    (["train", "--elastic-sigma", "1e12"], "elastic-sigma: must be at most 100 pixels"),
])
def test_bad_input_gives_one_line(capsys, argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default run directory (runs/mnist) would be made
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("argv", [["--device", "cuda"], ["-g", "0"], ["--device", "cuda:1"]])
def test_cuda_without_a_gpu(capsys, argv):
    code, _, err = run_cli(capsys, "train", "-e", "1", *argv)
    assert_one_line_error(code, err, "no CUDA GPU")


def test_unwritable_save_directory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "train", "-e", "1", "--save", str(blocker / "run"))
    assert_one_line_error(code, err, "cannot write there")


def test_zero_epochs_is_refused_before_anything_is_written(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "-e", "0", "--save", str(tmp_path / "run"))
    assert_one_line_error(code, err, "--epoch", "must be positive")
    assert not (tmp_path / "run").exists()


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    code, _, err = run_cli(capsys, "evaluate", "--load", str(garbage))
    assert_one_line_error(code, err, "garbage.pt", "not a capsnet checkpoint")

    # a pickle that would run code on load: weights_only refuses it and nothing runs
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "capsnet-checkpoint", "x": _Evil(str(marker))}, evil)
    code, _, err = run_cli(capsys, "evaluate", "--load", str(evil))
    assert_one_line_error(code, err, "evil.pt", "not a capsnet checkpoint", "never unpickles")
    assert "weights_only" not in err  # torch's own message advises loading it unsafely
    assert not marker.exists()

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    code, _, err = run_cli(capsys, "evaluate", "--load", str(other))
    assert_one_line_error(code, err, "other.pt: not a capsnet checkpoint")

    # whatever the bytes, one line: text, nothing, noise, pickle opcodes cut short
    torch.manual_seed(0)
    for name, data in [("text.pt", b"root:x:0:0:root:/root:/bin/bash\n" * 40), ("empty.pt", b""),
                       ("noise.pt", bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist())),
                       ("cut.pt", b"\x80\x02}q\x00(X\x06\x00\x00\x00format")]:
        (tmp_path / name).write_bytes(data)
        for command in ("evaluate", "visualize"):
            code, _, err = run_cli(capsys, command, "--load", str(tmp_path / name))
            assert_one_line_error(code, err, name, "not a capsnet checkpoint")

    # ours in form, nonsense in content
    odd = tmp_path / "odd.pt"
    torch.save({"format": "capsnet-checkpoint", "version": 1, "model_config": "paper", "model": {}}, odd)
    code, _, err = run_cli(capsys, "evaluate", "--load", str(odd))
    assert_one_line_error(code, err, "odd.pt: weights do not fit")


def test_pictures_into_a_file_are_refused_and_the_file_kept(trained_run, tmp_path, capsys):
    blocker = tmp_path / "pics"
    blocker.write_text("keep me")
    code, _, err = run_cli(capsys, "visualize", "--load", str(trained_run), "--out", str(blocker))
    assert_one_line_error(code, err, "pics", "a file stands where a folder is needed")
    assert blocker.read_text() == "keep me"


def test_checkpoint_of_another_architecture(trained_run, tmp_path, capsys):
    ckpt = torch.load(trained_run / "model.pt", weights_only=True)
    ckpt["model_config"]["shared_weights"] = True  # weights of per-capsule matrices under a shared config
    bad = tmp_path / "mismatch.pt"
    torch.save(ckpt, bad)
    code, _, err = run_cli(capsys, "evaluate", "--load", str(bad))
    assert_one_line_error(code, err, "mismatch.pt: weights do not fit")


def test_corrupt_data_names_the_file(tmp_path, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 100)
    code, _, err = run_cli(capsys, "train", "-e", "1", "--data-dir", str(tmp_path), "--save", str(tmp_path / "r"))
    assert_one_line_error(code, err, "train-images-idx3-ubyte")


def test_errors_in_counts_in_words():
    assert [errors_in(k, 10) for k in (0, 1, 2)] == ["0 errors in 10", "1 error in 10", "2 errors in 10"]


def test_running_out_of_memory_or_an_interrupt_is_one_line(monkeypatch, capsys, tmp_path):
    import capsnet.cli

    def fail_with(exc):
        def command(*args, **kwargs):
            raise exc
        return command

    monkeypatch.setitem(capsnet.cli.COMMANDS, "report", fail_with(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: you tried to allocate 7 GB")))
    code, _, err = run_cli(capsys, "report")
    assert_one_line_error(code, err, "out of memory", "can't allocate memory", "try a smaller --batchsize")
    monkeypatch.setitem(capsnet.cli.COMMANDS, "report", fail_with(RuntimeError("shapes do not match")))
    with pytest.raises(RuntimeError, match="shapes do not match"):  # a bug stays a bug, with its traceback
        main(["report"])
    monkeypatch.setitem(capsnet.cli.COMMANDS, "report", fail_with(KeyboardInterrupt()))
    code, _, err = run_cli(capsys, "report")
    assert code == 130 and err.strip() == "capsnet: interrupted"  # no last.pt to speak of
    # train: the interrupt reaches main from inside cmd_train, after it chose the run's directory
    import capsnet.data
    import capsnet.train

    monkeypatch.setattr(capsnet.data, "load_dataset", fail_with(KeyboardInterrupt()))
    monkeypatch.setattr(capsnet.train, "resume_state", fail_with(KeyboardInterrupt()))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--save", str(run))  # before the first epoch ended
    assert code == 130 and err.strip() == "capsnet: interrupted before the first epoch ended: no last.pt to resume from"
    for flags, where in ((["--save", str(run), "--force"], run), (["--resume", str(run)], run),
                         (["--force"], Path("runs") / "mnist")):  # the default directory
        where.mkdir(parents=True, exist_ok=True)
        (where / "last.pt").write_bytes(b"")
        code, _, err = run_cli(capsys, "train", *flags)
        assert code == 130 and err.strip() == f"capsnet: interrupted; training continues from the last finished " \
                                              f"epoch with --resume {where}", flags


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "capsnet", "train", "-b", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "capsnet: error: argument -b/--batchsize: must be positive, got 0 " \
                                  "(see capsnet train --help)"


def test_version_names_capsnet_and_torch():
    import capsnet

    proc = subprocess.run([sys.executable, "-m", "capsnet", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"capsnet {capsnet.__version__} (torch {torch.__version__})"


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """`capsnet report | head`: no traceback and no error line once the pipe's reader has gone."""
    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "capsnet", "report", "--results", str(results)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""


def test_the_prepared_device_jobs_are_valid_train_commands():
    """Each line of tools/jobs/* ("NAME FLAGS...") is one `capsnet train`: a typo there would cost
    device time, so every line must parse, and names must not repeat within a file."""
    from capsnet.cli import build_parser

    files = sorted((Path(__file__).resolve().parents[1] / "tools" / "jobs").iterdir())
    assert files
    for path in files:
        lines = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert lines, path
        names = [line[0] for line in lines]
        assert len(set(names)) == len(names), f"{path.name}: repeated run names"
        for name, *flags in lines:
            args = build_parser().parse_args(["train", *flags])  # exits (fails the test) on a bad flag
            assert args.seed is not None, f"{path.name}: {name} names no seed"


def test_evaluating_on_another_data_set_than_the_model_was_trained_on_is_said(trained_run, tmp_path, capsys):
    from capsnet.checkpoint import load_checkpoint
    from capsnet.files import atomic_torch_save

    ckpt = load_checkpoint(trained_run / "model.pt")
    assert ckpt["dataset"] == "mnist"
    code, out, err = run_cli(capsys, "evaluate", "--load", str(trained_run), "--dataset", "mnist", "--device", "cpu")
    assert code == 0 and "note:" not in err  # the data set it was trained on: nothing to say
    ckpt["dataset"] = "fashion-mnist"  # as if trained on Fashion-MNIST (images of the same size)
    other = tmp_path / "fashion.pt"
    atomic_torch_save(ckpt, other)
    code, out, err = run_cli(capsys, "evaluate", "--load", str(other), "--dataset", "mnist", "--device", "cpu")
    assert code == 0 and out.startswith("test accuracy")
    assert f"note: {other} was trained on fashion-mnist; testing it on mnist as asked" in err
