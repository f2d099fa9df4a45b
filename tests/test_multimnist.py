"""MultiMNIST: the pairs, the two-object loss and accuracy, and a run through the command line."""
import json
import math

import pytest
import torch

from capsnet.cli import main
from capsnet.config import TrainConfig
from capsnet.data import Dataset, load_dataset, multimnist
from capsnet.losses import margin_loss
from capsnet.model import CapsNet
from capsnet.train import check_settings, evaluate, fit, matches, prepare_run_dir, split_validation, top_classes

from conftest import small_model_config, synthetic


def _digits(n=64, seed=0):
    """Synthetic 28x28 'digits' of four classes (each lights its own quadrant)."""
    return synthetic(n_train=n, n_test=n, size=28, classes=4, seed=seed)


def test_overlay_keeps_each_digit_whole_and_adds_them_capped():
    data = _digits()
    g = torch.Generator().manual_seed(0)
    first, second = data.train_images[:32], data.train_images[32:]
    images, parts = multimnist.overlay(first, second, g)
    assert images.shape == (32, 1, 36, 36) and parts.shape == (32, 2, 1, 36, 36)
    assert images.dtype == parts.dtype == torch.uint8
    # Each part is its digit, whole, at some offset of at most 4 pixels each way from the centre.
    offsets = []
    for part, digit in ((parts[:, 0], first), (parts[:, 1], second)):
        for i in range(32):
            found = [(dy, dx) for dy in range(9) for dx in range(9)
                     if torch.equal(part[i, :, dy:dy + 28, dx:dx + 28], digit[i])]
            assert len(found) == 1, i
            assert part[i].sum() == digit[i].sum()  # nothing outside the digit's own square
            offsets.append(found[0])
    assert len(set(offsets)) > 20  # 81 places, each digit its own
    assert torch.equal(images, (parts[:, 0].int() + parts[:, 1].int()).clamp(max=255).to(torch.uint8))


def test_partners_are_of_another_class_and_follow_the_seed():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])  # most of the pool is one class
    picks = [multimnist.partners(labels, labels, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(picks[0], picks[1])
    assert (labels[picks[0]] != labels).all()
    other = multimnist.partners(labels, labels, torch.Generator().manual_seed(6))
    assert not torch.equal(other, picks[0])


def test_digits_of_one_class_cannot_be_paired():
    from capsnet.errors import CapsNetError

    with pytest.raises(CapsNetError, match="all 3s"):
        multimnist.fixed_pairs(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.full((4,), 3), 1, "test digits")


def test_the_test_and_validation_pairs_are_fixed():
    base = _digits(n=80)
    one, two = multimnist.derive(base), multimnist.derive(base)
    assert one.name == "multimnist" and one.digits == 2 and one.image_size == 36
    assert torch.equal(one.test_images, two.test_images) and torch.equal(one.test_labels, two.test_labels)
    assert (one.test_labels[:, 0] == base.test_labels).all()  # each test digit, with a partner
    assert (one.test_labels[:, 0] != one.test_labels[:, 1]).all()
    train_x, train_y, val_x, val_y = split_validation(one, 16)
    assert train_x.shape == (64, 1, 28, 28) and val_x.shape == (16, 1, 36, 36) and val_y.shape == (16, 2)
    assert torch.equal(val_x, split_validation(two, 16)[2])
    # Validation pairs are made from the held-out digits alone.
    assert set(val_y.flatten().tolist()) <= set(base.train_labels[64:].tolist())


def test_the_margin_loss_counts_both_digits_as_present():
    lengths = torch.tensor([[0.95, 0.2, 0.95, 0.05], [0.5, 0.5, 0.0, 0.0]])
    both = margin_loss(lengths, torch.tensor([[0, 2], [1, 0]]))
    # Row 1: both present past m+, 0.2 absent (0.5 * 0.1^2). Row 2: both present at 0.5 (0.4^2 each).
    assert both.item() == pytest.approx((0.5 * 0.01 + 2 * 0.16) / 2)
    single = margin_loss(lengths, torch.tensor([0, 1]))
    assert single.item() != pytest.approx(both.item())


def test_a_pair_is_right_only_when_both_classes_are():
    lengths = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.9, 0.1, 0.8, 0.0], [0.1, 0.7, 0.8, 0.0]])
    top = top_classes(lengths, 2)
    assert top.tolist() == [[0, 2], [0, 2], [2, 1]]
    assert matches(top, torch.tensor([[2, 0], [0, 1], [1, 2]])).tolist() == [True, False, True]
    assert matches(top_classes(lengths), torch.tensor([0, 2, 2])).tolist() == [True, False, True]


def test_the_decoder_reconstructs_each_labelled_digit_through_its_own_capsule():
    data = multimnist.derive(_digits())
    torch.manual_seed(0)
    model = CapsNet(small_model_config(data)).eval()
    images = data.test_images[:4].float() / 255
    out = model(images, data.test_labels[:4])
    assert out.recon.shape == (4, 2, 1, 36, 36)
    for m in range(2):
        assert torch.allclose(out.recon[:, m], model.reconstruct(out.poses, data.test_labels[:4, m]))


def test_a_small_capsnet_learns_to_name_both_digits(tmp_path):
    data = multimnist.derive(synthetic(n_train=512, n_test=128, size=28, classes=4))
    run = tmp_path / "run"
    prepare_run_dir(run, force=False)
    cfg = TrainConfig(epochs=4, batch_size=32, val_size=64, precision="fp32", schedule="exp", lr_decay=1.0, seed=3)
    summary = fit(small_model_config(data), cfg, data, run, torch.device("cpu"), verbose=False)
    # Chance for a pair of 4 classes is 1 in 6.
    assert summary["final_test_acc"] > 0.8, summary
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["train_acc"] > log[0]["train_acc"]
    from capsnet.checkpoint import load_model

    ok, n = evaluate(load_model(run / "final.pt"), data.test_images, data.test_labels, cfg, "fp32")
    assert (ok / n, n) == (summary["final_test_acc"], 128)


def test_single_digit_augmentations_are_refused():
    from capsnet.errors import CapsNetError

    data = multimnist.derive(_digits())
    for setting, flag in (({"max_rotation": 10.0}, "--rotate"), ({"max_scale": 0.1}, "--scale"),
                          ({"elastic": 34.0}, "--elastic"), ({"erase": 4}, "--erase"),
                          ({"clean_epochs": 1}, "--clean-epochs")):
        with pytest.raises(CapsNetError, match=flag):
            check_settings(TrainConfig(val_size=16, **setting), data, torch.device("cpu"))
    check_settings(TrainConfig(val_size=16), data, torch.device("cpu"))
    with pytest.raises(CapsNetError, match="training digits are all"):
        check_settings(TrainConfig(val_size=16), Dataset(
            "multimnist", torch.zeros(40, 1, 28, 28, dtype=torch.uint8), torch.tensor([1] * 24 + [1, 2] * 8),
            data.test_images, data.test_labels, 4, digits=2), torch.device("cpu"))


def test_multimnist_from_the_command_line(tmp_path, mnist, capsys):
    """A short real run: train, evaluate (the logged figure again), visualize, and what is refused."""
    data = load_dataset("multimnist", None, log=lambda *a: None)
    assert data.test_images.shape == (10000, 1, 36, 36)
    assert (data.test_labels[:, 0] == mnist.test_labels).all() and (data.test_labels[:, 0] != data.test_labels[:, 1]).all()
    run = tmp_path / "run"
    code = main(["train", "--dataset", "multimnist", "--recipe", "fast", "-e", "1", "--limit", "256", "--val", "64", "-b", "64",
                 "--save", str(run), "-q", "--device", "cpu"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_images"] == 10000
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["max_shift"], train["lr"]) == (4, 1e-3)  # the paper's shift for pairs; a rate that learns them
    capsys.readouterr()
    assert main(["evaluate", "--load", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"test accuracy on multimnist {summary['test_acc'] * 100:.2f}% "
                          f"({summary['test_errors']} errors in 10000)"), out
    assert main(["visualize", "--load", str(run), "--device", "cpu"]) == 0
    from PIL import Image

    names = ["vis_multi.png", "vis_errors.png"] + [f"vis_tweaked{k}.png" for k in range(10)]
    assert sorted(p.name for p in run.glob("vis*.png")) == sorted(names)  # no vis.png or vis_all.png
    tile = 32  # 31 px tile + 1 px line
    for k in range(10):  # a digit's capsule swept: 16 dimensions x 9 rows
        assert Image.open(run / f"vis_tweaked{k}.png").size == (16 * tile + 1, 9 * tile + 1)
    # vis_errors: the first 100 wrong pairs in vis_multi's layout (blocks of 20 columns: the true
    # classes, the images, the reconstructions, the chosen classes); vis_multi: the first 40 pairs
    drawn = min(summary["test_errors"], 100)
    assert drawn > 0
    assert Image.open(run / "vis_errors.png").size == (min(drawn, 20) * tile + 1, math.ceil(drawn / 20) * 4 * tile + 1)
    assert Image.open(run / "vis_multi.png").size == (20 * tile + 1, 2 * 4 * tile + 1)
    capsys.readouterr()
    assert main(["evaluate", "--load", str(run), "--per-class", "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("capsnet: error: --per-class counts one class per image") and err.count("\n") == 1
    assert main(["train", "--dataset", "multimnist", "--rotate", "5", "-e", "1", "--save", str(tmp_path / "r"),
                 "--device", "cpu"]) != 0
    assert "--rotate work on single digits only" in capsys.readouterr().err
    assert main(["train", "--dataset", "multimnist", "--shift", "5", "-e", "1", "--save", str(tmp_path / "r"),
                 "--device", "cpu"]) != 0
    assert "--shift 0 to 4, not 5" in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.json").exists()
    # A 36px model on 28px images (or the reverse) is one line, not a shape error from deep inside.
    assert main(["evaluate", "--load", str(run), "--dataset", "mnist", "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model takes 36px images" in err and "mnist's are 28px" in err, err


def test_the_tweak_pictures_take_the_first_pair_holding_each_digit():
    from capsnet.errors import CapsNetError
    from capsnet.viz import pick_examples

    labels = torch.tensor([[3, 1], [0, 2], [1, 0], [2, 3]])
    assert pick_examples(labels, 4, 1).tolist() == [1, 0, 1, 0]
    assert pick_examples(labels, 4, 2).tolist() == [1, 2, 0, 2, 1, 3, 0, 3]
    with pytest.raises(CapsNetError, match="fewer than 1 images holding class 4"):
        pick_examples(labels, 5, 1)


def test_a_resumed_run_draws_the_same_pairs_as_a_straight_one(tmp_path):
    from capsnet.checkpoint import load_checkpoint
    from capsnet.train import resume_state

    data = multimnist.derive(_digits(n=96))
    cfg = TrainConfig(epochs=2, batch_size=32, val_size=16, precision="fp32", seed=3)

    class Stop(Exception):
        pass

    def stop_in_epoch_2(epoch, model):
        if epoch > 1:
            raise Stop

    def train(name, resume=None, hook=None):
        run = tmp_path / name
        if resume is None:
            prepare_run_dir(run, force=False)
        fit(small_model_config(data), cfg, data, run, torch.device("cpu"), verbose=False,
            resume=resume_state(run) if resume else None, on_epoch_end=hook)
        return run

    straight = train("straight")
    with pytest.raises(Stop):
        train("split", hook=stop_in_epoch_2)
    split = train("split", resume=True)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_partners_are_uniform_over_the_other_classes_digits():
    pool = torch.tensor([0, 1, 1, 2, 2, 2, 2, 0])
    picks = multimnist.partners(pool, torch.full((20000,), 1), torch.Generator().manual_seed(0), num_classes=3)
    counts = torch.bincount(picks, minlength=8).float() / 20000
    # Digits 0, 3, 4, 5, 6 and 7 (classes 0 and 2), a sixth of the draws each; never 1 or 2 (class 1).
    assert counts[[1, 2]].sum() == 0
    assert torch.allclose(counts[[0, 3, 4, 5, 6, 7]], torch.full((6,), 1 / 6), atol=0.015)


def test_the_shift_of_a_pair_s_digits_is_bounded():
    from capsnet.errors import CapsNetError

    digits = _digits().train_images[:16]
    g = torch.Generator().manual_seed(0)
    _, parts = multimnist.overlay(digits, digits.flip(0), g, max_shift=0)
    assert torch.equal(parts[:, 0, :, 4:32, 4:32], digits)  # centred
    with pytest.raises(CapsNetError, match="0 to 4 px, not 5"):
        multimnist.overlay(digits, digits, g, max_shift=5)


def test_the_data_set_s_settings_come_between_the_recipe_and_the_flags():
    from capsnet.config import recipe_config

    assert (recipe_config("fast").lr, recipe_config("fast").max_shift) == (2e-3, 2)
    fast = recipe_config("fast", dataset="multimnist")
    assert (fast.lr, fast.max_shift, fast.epochs) == (1e-3, 4, 9)
    assert recipe_config("fast", dataset="multimnist", lr=5e-4, max_shift=3).lr == 5e-4
    assert recipe_config("fast", dataset="multimnist", lr=5e-4, max_shift=3).max_shift == 3
