import json

import pytest
import torch

from capsnet.checkpoint import load_checkpoint, load_model
from capsnet.config import TrainConfig
from capsnet.model import CapsNet
from capsnet.train import evaluate, fit, prepare_run_dir, resume_state, step

from conftest import small_model_config, synthetic


def _fit(tmp_path, data, epochs, resume=None, name="run", argv=None, **settings):
    run = tmp_path / name
    if resume is None:
        prepare_run_dir(run, force=False)
    cfg = TrainConfig(epochs=epochs, batch_size=32, val_size=16, precision="fp32", seed=3, **settings)
    return run, fit(small_model_config(data), cfg, data, run, torch.device("cpu"), resume=resume, verbose=False,
                    argv=argv)


class _Stop(Exception):
    pass


def _stop_after(epochs):
    def hook(epoch, model):
        if epoch > epochs:  # called before epoch's checkpoint: last.pt keeps `epochs`
            raise _Stop
    return hook


@pytest.mark.parametrize("settings", [{"schedule": "exp", "ema_decay": 0.0}, {"schedule": "cosine", "ema_decay": 0.9},
                                      {"freeze_conv1_after": 1}],
                         ids=["exp", "cosine-ema", "conv1-frozen"])
def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path, tiny_data, settings):
    straight, _ = _fit(tmp_path, tiny_data, 3, name="straight", **settings)
    split = tmp_path / "split"
    prepare_run_dir(split, force=False)
    cfg = TrainConfig(epochs=3, batch_size=32, val_size=16, precision="fp32", seed=3, **settings)
    with pytest.raises(_Stop):  # interrupted during epoch 3
        fit(small_model_config(tiny_data), cfg, tiny_data, split, torch.device("cpu"), verbose=False,
            on_epoch_end=_stop_after(2), argv=["train", "--save", "split"])
    _, summary = _fit(tmp_path, tiny_data, 3, resume=resume_state(split), name="split",
                      argv=["train", "--resume", "split"], **settings)
    # config.json keeps the command that started the run and records the session that resumed it
    config = json.loads((split / "config.json").read_text())
    assert config["argv"] == ["train", "--save", "split"]
    assert [(r["epoch"], r["argv"]) for r in config["resumes"]] == [(2, ["train", "--resume", "split"])]
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(split / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    lines_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines_b] == [1, 2, 3]
    assert [x["train_loss"] for x in lines_a] == [x["train_loss"] for x in lines_b]
    assert [x["val_acc"] for x in lines_a] == [x["val_acc"] for x in lines_b]
    assert summary["test_images"] == 40
    if settings.get("ema_decay"):
        for key in a["average"]["model"]:
            assert torch.equal(a["average"]["model"][key], b["average"]["model"][key]), key


def _weights_after_each_epoch(tmp_path, data, name, epochs=2, **settings):
    """A fresh run's state_dict after each of its epochs (seed 3)."""
    seen = []

    def keep(epoch, model):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    run = tmp_path / name
    prepare_run_dir(run, force=False)
    cfg = TrainConfig(epochs=epochs, batch_size=32, val_size=16, precision="fp32", seed=3, **settings)
    fit(small_model_config(data), cfg, data, run, torch.device("cpu"), verbose=False, on_epoch_end=keep)
    return seen


def test_conv1_stops_training_after_the_given_epoch_and_the_rest_goes_on(tmp_path, tiny_data):
    seen = _weights_after_each_epoch(tmp_path, tiny_data, "run", epochs=3, freeze_conv1_after=1)
    torch.manual_seed(3)  # the seed _weights_after_each_epoch trains with
    initial = CapsNet(small_model_config(tiny_data)).state_dict()
    assert not torch.equal(seen[0]["conv1.weight"], initial["conv1.weight"])  # trained in epoch 1 ...
    assert torch.equal(seen[1]["conv1.weight"], seen[0]["conv1.weight"])  # ... then frozen
    assert torch.equal(seen[2]["conv1.bias"], seen[0]["conv1.bias"])
    assert not torch.equal(seen[2]["primary.conv.weight"], seen[1]["primary.conv.weight"])  # the rest trains on


def test_clean_epochs_train_the_last_epochs_on_unshifted_images(tmp_path, tiny_data):
    shifted = _weights_after_each_epoch(tmp_path, tiny_data, "shifted", max_shift=2)
    clean_last = _weights_after_each_epoch(tmp_path, tiny_data, "clean-last", max_shift=2, clean_epochs=1)
    never = _weights_after_each_epoch(tmp_path, tiny_data, "never", max_shift=0)
    clean_all = _weights_after_each_epoch(tmp_path, tiny_data, "clean-all", max_shift=2, clean_epochs=2)
    key = "primary.conv.weight"
    assert torch.equal(clean_last[0][key], shifted[0][key])  # epoch 1: shifted as usual ...
    assert not torch.equal(clean_last[1][key], shifted[1][key])  # ... epoch 2: not
    for a, b in zip(clean_all, never):  # every epoch clean: the same as no shifts at all
        assert torch.equal(a[key], b[key])
    assert not torch.equal(never[0][key], shifted[0][key])  # (and shifts do change what is learned)


def test_run_directory_contents(tmp_path, tiny_data):
    run, summary = _fit(tmp_path, tiny_data, 2, schedule="exp")
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["model"]["routing_iters"] == 3
    assert config["torch"] == torch.__version__ and config["device"] == "cpu"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[0]) >= {"epoch", "lr", "train_loss", "train_acc", "val_acc", "img_s", "seconds"}
    assert records[1]["lr"] == pytest.approx(1e-3 * 0.95)
    best = max(records, key=lambda r: (r["val_acc"], r["epoch"]))
    assert summary["selected_epoch"] == best["epoch"]  # chosen on validation alone
    model = load_model(run)
    ok, n = evaluate(model, tiny_data.test_images, tiny_data.test_labels, TrainConfig(), "fp32")
    assert ok / n == summary["test_acc"]


def test_the_final_model_is_saved_and_tested_beside_the_chosen_one(tmp_path, tiny_data):
    run, summary = _fit(tmp_path, tiny_data, 3, schedule="cosine", ema_decay=0.9)
    final, last = load_checkpoint(run / "final.pt"), load_checkpoint(run / "last.pt")
    assert final["kind"] == "model" and final["epoch"] == summary["final_epoch"] == 3
    for key, value in final["model"].items():  # the moving average, as the last epoch left it
        assert torch.equal(value, last["average"]["model"][key]), key
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert final["val_acc"] == records[-1]["val_acc"]
    ok, n = evaluate(load_model(run / "final.pt"), tiny_data.test_images, tiny_data.test_labels, TrainConfig(), "fp32")
    assert (summary["final_test_acc"], summary["final_test_errors"]) == (ok / n, n - ok)

    # A finished run saved before final.pt existed gets it on --resume, without training more.
    (run / "final.pt").unlink()
    _, again = _fit(tmp_path, tiny_data, 3, resume=resume_state(run), schedule="cosine", ema_decay=0.9)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    for key, value in load_checkpoint(run / "final.pt")["model"].items():
        assert torch.equal(value, final["model"][key]), key
    assert again["final_test_acc"] == summary["final_test_acc"]


def test_a_crash_just_after_an_epoch_s_checkpoint_loses_no_record(tmp_path, tiny_data, monkeypatch):
    import capsnet.train

    saved = capsnet.train.atomic_torch_save

    def save_then_crash(obj, path):  # the process dies right after last.pt of epoch 2 is written
        saved(obj, path)
        if path.name == "last.pt" and obj["epoch"] == 2:
            raise _Stop

    monkeypatch.setattr(capsnet.train, "atomic_torch_save", save_then_crash)
    with pytest.raises(_Stop):
        _fit(tmp_path, tiny_data, 3, schedule="exp")
    monkeypatch.setattr(capsnet.train, "atomic_torch_save", saved)
    run = tmp_path / "run"
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a record cut short by a crash while it was written (epoch 3 of a run whose last.pt has epoch 2)
    # is dropped on --resume, and the epoch runs again
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lr": 0.00')
    _fit(tmp_path, tiny_data, 3, resume=resume_state(run), schedule="exp")
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_run_directory_is_not_overwritten(tmp_path, tiny_data):
    run, _ = _fit(tmp_path, tiny_data, 1)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(Exception, match="already holds a run"):
        prepare_run_dir(run, force=False)
    assert (run / "last.pt").read_bytes() == before


def test_small_capsnet_learns_synthetic_data(tmp_path):
    data = synthetic(n_train=256, n_test=64)
    run = tmp_path / "learn"
    prepare_run_dir(run, force=False)
    # A constant rate: over 28 steps a cosine's lower mean rate leaves this toy half-learned.
    cfg = TrainConfig(epochs=4, batch_size=32, val_size=32, precision="fp32", max_shift=1, schedule="exp", lr_decay=1.0)
    summary = fit(small_model_config(data), cfg, data, run, torch.device("cpu"), verbose=False)
    assert summary["test_acc"] > 0.9


def test_training_step_reduces_the_loss_on_a_fixed_batch(tiny_data):
    from capsnet.model import CapsNet

    torch.manual_seed(0)
    model = CapsNet(small_model_config(tiny_data))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = tiny_data.train_images[:32].float() / 255
    y = tiny_data.train_labels[:32]
    first, _ = step(model, x, y, TrainConfig(), "fp32", opt)
    for _ in range(20):
        last, _ = step(model, x, y, TrainConfig(), "fp32", opt)
    assert last < first * 0.5


def test_capsnet_learns_real_mnist(mnist):
    """A few hundred steps on 2,000 real training images; tested on 2,000 test images."""
    from capsnet.data import Dataset

    data = Dataset("mnist", mnist.train_images[:2000], mnist.train_labels[:2000], mnist.test_images[:2000],
                   mnist.test_labels[:2000], 10)
    import tempfile
    from pathlib import Path

    from capsnet.train import model_config_for

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        prepare_run_dir(run, force=False)
        cfg = TrainConfig(epochs=4, batch_size=32, val_size=0)  # 4 x 63 = 252 steps, default precision
        summary = fit(model_config_for(data), cfg, data, run, torch.device("cpu"), verbose=False)
    assert summary["test_acc"] > 0.90, summary


def test_progress_bar_shows_loss_and_running_accuracy(capsys):
    from capsnet.train import EpochLog

    log = EpochLog(True)
    log.tty = True  # as on a terminal
    update = log.start(0, 3, total=8)
    update(4, torch.tensor(0.5), torch.tensor(3))
    update(4, torch.tensor(0.25), torch.tensor(1))
    assert log.bar.postfix == "acc=50.00%, loss=0.2500"  # 4 right of 8 seen
    log.end({"epoch": 1, "lr": 1e-3, "train_loss": 0.3, "train_acc": 0.5, "val_acc": 0.75, "img_s": 10.0,
             "seconds": 1.0})
    out = capsys.readouterr().out
    assert "epoch 1" in out and "val 75.00%" in out and "10 img/s" in out


def test_confusion_counts_each_true_and_predicted_pair():
    from capsnet.cli import per_class_lines
    from capsnet.train import confusion

    counts = confusion(torch.tensor([0, 1, 1, 2, 1, 0]), torch.tensor([0, 1, 2, 2, 2, 2]), 3)
    assert counts.tolist() == [[1, 0, 0], [0, 1, 0], [1, 2, 1]]
    assert per_class_lines(counts, ("a", "b", "c")) == ["  a  100.0%  1 of 1", "  b  100.0%  1 of 1",
                                                        "  c   25.0%  1 of 4; read as b 2, a 1"]
    empty = confusion(torch.tensor([0]), torch.tensor([0]), 2)
    assert per_class_lines(empty, ("zero", "one"))[1] == "  one       -  0 of 0"
