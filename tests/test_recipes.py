import math

import pytest
import torch
from torch import nn

from capsnet.averaging import WeightAverage
from capsnet.checkpoint import load_checkpoint
from capsnet.config import RECIPE_MODELS, RECIPES, ModelConfig, TrainConfig, recipe_config, recipe_model_settings
from capsnet.train import configs_from_state, fit, learning_rate, prepare_run_dir

from conftest import small_model_config


def test_exponential_schedule_is_constant_within_an_epoch_and_floored():
    cfg = TrainConfig(lr=1e-3, lr_decay=0.5, lr_min=2e-4, epochs=10, schedule="exp")
    assert learning_rate(cfg, 0) == learning_rate(cfg, 0.99) == 1e-3
    assert learning_rate(cfg, 1.5) == pytest.approx(5e-4)
    assert learning_rate(cfg, 2) == pytest.approx(2.5e-4)
    assert learning_rate(cfg, 7) == 2e-4


def test_cosine_schedule_falls_smoothly_from_lr_to_the_floor():
    cfg = TrainConfig(lr=1e-3, lr_min=1e-5, epochs=4, schedule="cosine")
    ts = [i / 10 for i in range(41)]
    rates = [learning_rate(cfg, t) for t in ts]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-5)
    assert rates[20] == pytest.approx((1e-3 + 1e-5) / 2)  # halfway
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_weight_average_follows_the_exponential_moving_average():
    live = nn.Linear(3, 2)
    avg = WeightAverage(live, decay=0.5)
    start = live.weight.detach().clone()
    expected = start.clone()
    for n in range(1, 6):
        with torch.no_grad():
            live.weight.add_(1.0)
        avg.update()
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * live.weight.detach()
    assert torch.allclose(avg.model.weight, expected)
    assert not torch.equal(avg.model.weight, live.weight)
    assert not avg.model.weight.requires_grad


def test_recipes_and_overrides():
    assert recipe_config() == TrainConfig()  # the dataclass defaults are the default recipe
    cfg = recipe_config("fast", seed=5)
    assert cfg.recipe == "fast" and cfg.seed == 5 and cfg.epochs == RECIPES["fast"]["epochs"] < TrainConfig().epochs
    assert cfg.ema_decay > 0 and cfg.schedule == "cosine"
    chainer = recipe_config("chainer", epochs=2)
    assert (chainer.batch_size, chainer.schedule, chainer.lr_decay, chainer.ema_decay, chainer.epochs) == \
        (256, "exp", 0.95, 0.0, 2)
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_config("nope")
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_model_settings("nope")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    for bad, match in [({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr must"),
                       ({"lr": -1e-3}, "lr must"), ({"lr_decay": 0.0}, "lr_decay"), ({"lr_decay": 1.5}, "lr_decay")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)


def test_each_recipe_names_only_real_model_settings_and_fast_routes_in_float32():
    assert set(RECIPE_MODELS) <= set(RECIPES)  # a misspelt recipe there would be ignored
    for name in RECIPES:
        ModelConfig(**recipe_model_settings(name))  # an unknown field would raise TypeError
    assert recipe_model_settings("fast") == {"fp32_routing": True}
    assert recipe_model_settings("default") == {} and not ModelConfig().fp32_routing
    recipe_model_settings("fast")["fp32_routing"] = False  # a copy: the table itself stays as it is
    assert recipe_model_settings("fast")["fp32_routing"] is True


def test_with_averaging_model_pt_holds_the_average_and_last_pt_both(tmp_path, tiny_data):
    run = tmp_path / "run"
    prepare_run_dir(run, force=False)
    cfg = TrainConfig(epochs=2, batch_size=32, val_size=0, precision="fp32", ema_decay=0.9)
    summary = fit(small_model_config(tiny_data), cfg, tiny_data, run, torch.device("cpu"), verbose=False)
    last, model = load_checkpoint(run / "last.pt"), load_checkpoint(run / "model.pt")
    assert last["average"]["updates"] == 2 * math.ceil(tiny_data.train_images.shape[0] / 32)
    for key, value in model["model"].items():
        assert torch.equal(value, last["average"]["model"][key]), key
    assert any(not torch.equal(v, last["model"][k]) for k, v in model["model"].items())
    assert summary["wall_seconds"] >= last["elapsed"] > 0


def test_a_checkpoint_from_before_the_recipes_resumes_as_it_was_trained(tmp_path, tiny_data):
    run = tmp_path / "run"
    prepare_run_dir(run, force=False)
    fit(small_model_config(tiny_data), TrainConfig(epochs=1, batch_size=32, val_size=0, precision="fp32",
                                                   schedule="exp", ema_decay=0.0), tiny_data, run,
        torch.device("cpu"), verbose=False)
    state = load_checkpoint(run / "last.pt")
    for key in ("schedule", "ema_decay", "recipe"):  # as capsnet wrote it before these settings
        del state["train_config"][key]
    _, cfg = configs_from_state(state)
    assert (cfg.schedule, cfg.ema_decay, cfg.recipe) == ("exp", 0.0, "chainer")
