import json

import pytest
import torch
import torch._dynamo.utils

from capsnet.bench import format_table, run_bench
from capsnet.cli import main
from capsnet.config import TrainConfig
from capsnet.errors import CapsNetError
from capsnet.layers import DigitCaps
from capsnet.model import CapsNet
from capsnet.routing import dynamic_routing, dynamic_routing_fusable
from capsnet.train import compile_model, step

from conftest import small_model_config


def test_fusable_routing_is_the_same_function():
    torch.manual_seed(0)
    u_hat = torch.randn(3, 50, 10, 16, dtype=torch.float64)  # [b, i, j, d]
    bias = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    for detach in (False, True):
        for b_j in (None, bias):
            a = dynamic_routing(u_hat.transpose(1, 2).contiguous(), 3, detach_inner=detach, bias=b_j)
            b = dynamic_routing_fusable(u_hat, 3, detach_inner=detach, bias=b_j)
            assert torch.allclose(a, b, atol=1e-12)
            if b_j is not None:  # the bias's gradient too, detached inner iterations included
                g_a, = torch.autograd.grad(a.pow(2).sum(), bias)
                g_b, = torch.autograd.grad(b.pow(2).sum(), bias)
                assert torch.allclose(g_a, g_b, atol=1e-12)


def test_compiled_capsule_layer_matches_eager():
    torch.manual_seed(0)
    for shared, bias in ((False, False), (True, False), (False, True)):
        layer = DigitCaps(in_caps=64, in_dim=8, out_caps=4, out_dim=8, routing_iters=3, types=4, shared=shared,
                          bias=bias)
        if bias:
            with torch.no_grad():
                layer.bias.normal_(0.0, 0.3)
        u = torch.randn(5, 64, 8, requires_grad=True)
        eager = layer(u)
        g_eager, = torch.autograd.grad(eager.pow(2).sum(), u)
        compiled = torch.compile(layer)(u)
        g_comp, = torch.autograd.grad(compiled.pow(2).sum(), u)
        assert torch.allclose(eager, compiled, atol=1e-5)
        assert torch.allclose(g_eager, g_comp, atol=1e-5)


def test_bench_reports_the_promised_fields():
    result = run_bench(torch.device("cpu"), precision="fp32", batch=4, steps=1, warmup=1, compile=False)
    for key in ("train_img_s", "eval_img_s", "peak_mem_mb", "precision", "batch", "threads", "device", "torch"):
        assert key in result, key
    assert result["train_img_s"] > 0 and result["eval_img_s"] > result["train_img_s"] / 10
    assert result["precision"] == "fp32" and result["batch"] == 4
    assert "train img/s" in format_table([result])


def test_bench_times_steps_with_conv1_frozen(monkeypatch):
    seen = []
    real_step = step

    def spy(model, *args, **kwargs):
        out = real_step(model, *args, **kwargs)
        seen.append(model.conv1.weight.grad is None and model.primary.conv.weight.grad is not None)
        return out

    monkeypatch.setattr("capsnet.bench.step", spy)
    result = run_bench(torch.device("cpu"), precision="fp32", batch=2, steps=1, warmup=1, compile=False,
                       frozen_conv1=True)
    assert seen and all(seen)  # conv1 got no gradient, the layer above it did
    assert result["conv1"] == "frozen" and "conv1 frozen" in format_table([result])


def test_bench_times_float32_routing_when_asked(monkeypatch):
    dtypes = []
    real = DigitCaps.grouped_predictions

    def spy(self, u):
        out = real(self, u)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(DigitCaps, "grouped_predictions", spy)
    for fp32_routing, expected in ((False, torch.bfloat16), (True, torch.float32)):
        dtypes.clear()
        result = run_bench(torch.device("cpu"), precision="bf16", batch=2, steps=1, warmup=0, compile=False,
                           fp32_routing=fp32_routing)
        assert dtypes and set(dtypes) == {expected}  # u_hat, in training and inference steps alike
        assert result["fp32_routing"] is fp32_routing
        assert ("fp32 routing" in format_table([result])) is fp32_routing


def test_bench_command_prints_one_json_line(capsys):
    assert main(["bench", "--json", "-b", "2", "--steps", "1", "--warmup", "0", "--no-compile", "--baseline",
                 "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert json.loads(line)["formulation"] == "baseline"


def test_bench_compare_refuses_what_it_would_ignore_and_reports_a_child_s_error(capsys):
    from capsnet.bench import run_in_subprocess

    for argv, needle in ((["--precision", "bogus"], "unknown precision 'bogus'"),
                         (["--fp32-routing"], "so it cannot take --fp32-routing"),
                         (["--no-compile", "--frozen-conv1"], "cannot take --frozen-conv1, --no-compile")):
        assert main(["bench", "--compare", "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    with pytest.raises(CapsNetError, match=r"^bench --device cpu --precision bogus: unknown precision 'bogus'"):
        run_in_subprocess(["--device", "cpu", "--precision", "bogus"])  # the child's line, its prefix once


def test_compile_modes_compile_what_they_name(tiny_data):
    cfg = small_model_config(tiny_data)
    for mode in ("model", "graphs"):
        model = CapsNet(cfg)
        compile_model(model, mode)
        assert model._compiled_call_impl is not None and model.digits._compiled_call_impl is None, mode
    model = CapsNet(cfg)
    compile_model(model, "model")
    torch.manual_seed(0)
    x, y = torch.rand(3, cfg.in_channels, cfg.image_size, cfg.image_size), torch.tensor([1, 2, 3])
    eager = CapsNet(cfg)
    eager.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out, ref = model(x, y), eager(x, y)  # the whole forward, compiled, is the same function
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled, not fallen back to eager
    assert torch.allclose(out.lengths, ref.lengths, atol=1e-5) and torch.allclose(out.recon, ref.recon, atol=1e-5)
    with pytest.raises(CapsNetError, match="unknown compile mode"):
        compile_model(CapsNet(cfg), "everything")
    with pytest.raises(ValueError, match="compile_mode"):
        TrainConfig(compile_mode="everything")
