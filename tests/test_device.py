"""Device choice and precision, checked on the CPU: --device plumbing (CUDA mocked as present), the residual-stream
dtype rule, fp16 loss scaling, TF32 for fp32 compute on CUDA."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, tiny_recipe
from qlora_kit.infer import generate
from qlora_kit.train import loop as train
from qlora_kit.data import pipeline as data
from qlora_kit.cli.main import main
from qlora_kit.device import allow_tf32, resolve_device
from qlora_kit.errors import ConfigError
from qlora_kit.model.load import frozen_dtype


class Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """Record the device generate hands to load_base, then stop (the load itself is tested elsewhere)."""
    seen = []

    def fake_load_base(model_cfg, quant_cfg, device="cpu", *args, **kwargs):
        seen.append(torch.device(device))
        raise Stop

    monkeypatch.setattr(generate, "load_base", fake_load_base)
    return seen


@pytest.mark.parametrize("cuda", [True, False])
def test_generate_and_eval_pick_cuda_when_present(tiny_model, tiny_data, captured, monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    want = torch.device("cuda" if cuda else "cpu")
    with pytest.raises(Stop):
        generate.load(str(tiny_model))
    with pytest.raises(Stop):
        generate.load_many(str(tiny_model), {})
    with pytest.raises(Stop):
        main(["generate", str(tiny_model), "--prompt", "hi"])
    with pytest.raises(Stop):
        main(["eval", str(tiny_model), "--data", str(tiny_data), "--format", "alpaca", "--no-progress"])
    assert captured == [want] * 4
    captured.clear()
    with pytest.raises(Stop):
        main(["generate", str(tiny_model), "--prompt", "hi", "--device", "cpu"])
    assert captured == [torch.device("cpu")]


@pytest.mark.parametrize("command", [["generate", "MODEL", "--prompt", "hi"], ["analyze", "MODEL"],
                                     ["eval", "MODEL", "--data", "wikitext-2"]])
def test_device_cuda_without_a_gpu_is_a_usage_error(tiny_model, monkeypatch, capsys, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [str(tiny_model) if a == "MODEL" else a for a in command] + ["--device", "cuda"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible" in err and "Traceback" not in err


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)


# ---- item 4: which 16-bit dtype, loss scaling, TF32 ---------------------------------------------------------------


def test_auto_dtype_is_bf16_where_supported_else_fp16(monkeypatch, tmp_path):
    assert frozen_dtype("auto", torch.float16) == torch.bfloat16  # an fp16 checkpoint: bf16 residual stream
    assert frozen_dtype("auto", "float16", bf16_ok=False) == torch.float16  # e.g. a T4/V100: fp16 + loss scaler
    assert frozen_dtype("fp16", torch.bfloat16) == torch.float16 and frozen_dtype("fp32", None) == torch.float32
    from qlora_kit import device

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert not device.bf16_supported("cuda") and device.bf16_supported("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert device.bf16_supported(torch.device("cuda", 0))


def test_fp16_residual_stream_trains_with_loss_scaling(tmp_path, tiny_data):
    model = make_tiny_model(tmp_path / "fp16", dtype=torch.float16)
    auto = train.prepare(tiny_recipe(model, tiny_data))
    assert auto.model.get_input_embeddings().weight.dtype == torch.bfloat16 and auto.optimizer.scaler is None
    recipe = tiny_recipe(model, tiny_data, model={"dtype": "fp16"}, lora={"dropout": 0.0})
    pad = None
    results = []
    for scale in (None, 2.0**4):
        p = train.prepare(recipe)
        assert p.model.get_input_embeddings().weight.dtype == torch.float16 and p.optimizer.scaler is not None
        pad = data.pad_token_id(p.tokenizer)
        batch = data.collate(p.dataset.train[:2], pad)
        if scale is None:
            p.optimizer.scaler = None
        else:
            p.optimizer.scaler.scale = scale
        seen, real_step = [], p.optimizer.inner.step
        p.optimizer.inner.step = lambda seen=seen, opt=p.optimizer: seen.append(
            torch.cat([g.clone() for g in opt.grad_buffers()]))
        res = train.train_step(p, [batch], lr=1e-2, max_grad_norm=0.0)
        p.optimizer.inner.step = real_step
        results.append((res, seen[0], p))
    (plain, g_plain, _), (scaled, g_scaled, p) = results
    assert scaled.grad_norm == pytest.approx(plain.grad_norm, rel=1e-3)  # unscaled before the norm
    # and before the step: the same gradient up to fp16 underflow, which the unscaled one suffers (the point of it)
    assert float((g_scaled - g_plain).norm() / g_plain.norm()) < 1e-2
    assert p.optimizer.scaler.good_steps == 1
    # An overflowing scale: the step is skipped (weights untouched), the scale halved, the run goes on.
    p.optimizer.scaler.scale = 2.0**100
    before = [q.detach().clone() for q in p.optimizer.params]
    res = train.train_step(p, [batch], lr=1e-2, max_grad_norm=0.0)
    assert res.finite and p.optimizer.scaler.scale == 2.0**99 and p.optimizer.scaler.good_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, p.optimizer.params))
    assert p.optimizer.state_dict()["loss_scale"] == [2.0**99, 0]


def test_tf32_only_for_fp32_compute_on_cuda():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not allow_tf32("cpu", torch.float32) and not allow_tf32("cuda", torch.bfloat16)
        assert torch.get_float32_matmul_precision() == "highest"
        assert allow_tf32(torch.device("cuda", 0), torch.float32)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
