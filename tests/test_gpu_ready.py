"""Ready for the GPU, the parts a CPU can check: flat fp32 masters equal the per-tensor wrapper bitwise,
host syncs per step, fp32 gradient accumulation, int8 codes independent of the input dtype, RNG of the training
device only, 8-bit optimizer state after a resume."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import tiny_recipe
from qlora_kit.train import loop as train
from qlora_kit.data import pipeline as data
from qlora_kit.adapters import lora
from qlora_kit.run import checkpoint
from qlora_kit.train.loss import label_positions

# ---- the reference: today's per-tensor master-weight wrapper and train_step, written out ---------------------------


class PerTensorMasters:
    """The former optimizer wrapper, kept as the reference the flat masters must match: one fp32 master per tensor
    (an fp32 parameter is its own), grads up-cast from the bf16 `.grad` that autograd accumulated, per-tensor norm,
    clip and copy-back."""

    def __init__(self, params, lr):
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in params]
        self.inner = torch.optim.AdamW(self.masters, lr=lr, weight_decay=0.0)  # train.weight_decay default

    def step(self, loss_fn, micro, lr, max_grad_norm):
        facts = [(b, int((b["labels"][:, 1:] != -100).sum())) for b in micro]
        total = max(sum(n for _, n in facts), 1)
        for b, n in facts:
            loss, _ = loss_fn(b["input_ids"], b["attention_mask"], b["labels"])  # boolean-mask path
            (loss * (n / total)).backward()
        for p, m in zip(self.params, self.masters):
            if p is not m:
                m.grad = p.grad.float()
        grads = [m.grad for m in self.masters]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if max_grad_norm > 0 and norm > max_grad_norm:
            for g in grads:
                g.mul_(max_grad_norm / (norm + 1e-6))
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if p is not m:
                    p.copy_(m)
                p.grad, m.grad = None, None


def _prepared(tiny_model, tiny_data, compute="bf16", **train_cfg):
    p = train.prepare(tiny_recipe(tiny_model, tiny_data, quant={"compute_dtype": compute},
                                  lora={"dropout": 0.1}, train=train_cfg))
    return p


@pytest.mark.parametrize("compute,accum", [("bf16", 1), ("fp32", 2)])
def test_flat_masters_equal_the_per_tensor_wrapper_bitwise(tiny_model, tiny_data, compute, accum):
    """bf16 x 1 micro-batch and fp32 x 2 (where summing in fp32 is what autograd did): the same math, so the
    same bits, through clipping (max_grad_norm below the norm) and three AdamW steps with dropout."""
    ours = _prepared(tiny_model, tiny_data, compute)
    ref = _prepared(tiny_model, tiny_data, compute)
    ref.optimizer.remove_hooks()
    params = [q for q in ref.model.parameters() if q.requires_grad]
    old = PerTensorMasters(params, 1e-2)
    pad = data.pad_token_id(ours.tokenizer)
    batches = [data.collate(ours.dataset.train[i : i + 2], pad) for i in range(0, 12, 2)]
    for step in range(3):
        micro = batches[step * accum : (step + 1) * accum]
        torch.manual_seed(step)
        res = train.train_step(ours, micro, lr=1e-2, max_grad_norm=0.05)
        torch.manual_seed(step)
        old.step(ref.loss_fn, micro, lr=1e-2, max_grad_norm=0.05)
        assert res.grad_norm > 0.05  # clipping ran
    mine = [q for q in ours.model.parameters() if q.requires_grad]
    assert len(mine) == len(params) == 28
    assert all(torch.equal(a, b) for a, b in zip(mine, params))
    assert all(torch.equal(a, b) for a, b in zip(ours.optimizer.masters, old.masters))
    assert not all(torch.equal(a, b) for a, b in zip(mine, _prepared(tiny_model, tiny_data, compute).optimizer.params))


# ---- host syncs ----------------------------------------------------------------------------------------------------

_SYNC_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu",
                 "masked_select", "unique", "any", "all"}


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts tensor -> host transfers (and data-dependent shapes, which sync a GPU) called from qlora_kit code,
    outside the functions that by contract only see the CPU batch (train.HOST_BATCH_FUNCS). Calls from the model
    (transformers) are counted apart. On a GPU `torch.cuda.set_sync_debug_mode` does this for real (make gpu-check)."""

    def __init__(self):
        super().__init__()
        self.ours, self.model = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        sync = name in _SYNC_METHODS or (name == "__getitem__" and _bool_index(args[1] if len(args) > 1 else None))
        if sync:
            where = _caller()
            if where is not None:
                (self.ours if where[0] == "ours" else self.model).append((name, where[1]))
        return func(*args, **(kwargs or {}))


def _bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


_PLUMBING = tuple(os.path.join(os.path.dirname(torch.__file__), f) for f in ("_tensor.py", "overrides.py", "utils"))


def _caller():
    """Who called the tensor method directly: qlora_kit ("ours"), transformers ("model"), or None (torch's own
    optimizers, bitsandbytes, accelerate: not counted here; on a GPU the sync debug mode covers them)."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(_PLUMBING) or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return None
    path = f.f_code.co_filename
    if os.sep + "qlora_kit" + os.sep in path:
        site = f"{os.path.basename(path)}:{f.f_lineno} {f.f_code.co_name}"
        g = f
        while g is not None and g.f_code.co_name in (*train.HOST_BATCH_FUNCS, "<listcomp>", "<genexpr>"):
            g = g.f_back
        if g is not f and g is not None and g.f_code.co_name == "train_step":
            return None  # train_step hands these the CPU batch, before it moves to the device
        return "ours", site
    if os.sep + "transformers" + os.sep in path:
        return "model", f"{os.path.basename(path)}:{f.f_lineno}"
    return None


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_host_syncs_per_optimizer_step(tiny_model, tiny_data, optimizer):
    p = _prepared(tiny_model, tiny_data, optimizer=optimizer, max_grad_norm=0.05)
    pad = data.pad_token_id(p.tokenizer)
    micro = [data.collate(p.dataset.train[i : i + 2], pad) for i in (0, 2)]  # grad_accum 2
    train.train_step(p, micro, lr=1e-3, max_grad_norm=0.05)  # warm-up: lazy state allocation
    with SyncCounter() as counter:
        for _ in range(2):
            train.train_step(p, micro, lr=1e-3, max_grad_norm=0.05)
    assert 1 <= len(counter.ours) / 2 <= 2, counter.ours  # the one loss+norm transfer per step
    # The counter sees what the old loss did: a boolean-mask gather of the label positions (a sync on a GPU).
    with SyncCounter() as counter, torch.no_grad():
        p.loss_fn(micro[0]["input_ids"], micro[0]["attention_mask"], micro[0]["labels"])
    assert counter.ours, "the counter must see label positions found on the device"


def test_positions_gather_equals_the_boolean_mask():
    labels = torch.tensor([[-100, 5, 6, -100, 7], [1, -100, -100, 2, 3]])
    pos = label_positions(labels)
    B, T = labels.shape
    hidden = torch.arange(B * T).view(B, T)
    assert torch.equal(hidden.reshape(-1)[pos], hidden[:, :-1][labels[:, 1:] != -100])
    assert torch.equal(labels.reshape(-1)[pos + 1], labels[:, 1:][labels[:, 1:] != -100])


# ---- fp32 gradient accumulation ------------------------------------------------------------------------------------


def test_grad_accum_sums_micro_batches_in_fp32(tiny_model, tiny_data):
    """bf16 compute, grad_accum 4: the optimizer's gradient is the fp32 sum of the four bf16 micro-batch gradients,
    within fp32 summation error (3 x 2^-24 x sum |g_i|), where bf16 accumulation in `.grad` is off by far more."""
    p = _prepared(tiny_model, tiny_data, "bf16")
    for mod in p.model.modules():
        if isinstance(mod, lora.LoRALinear):
            torch.nn.init.normal_(mod.lora_B.weight, std=0.1)
    p.optimizer.sync_from_params()
    p.model.eval()  # no dropout: every backward sees the same function
    pad = data.pad_token_id(p.tokenizer)
    micro = [data.collate(p.dataset.train[i : i + 2], pad) for i in range(0, 8, 2)]
    weights = [len(label_positions(b["labels"])) for b in micro]
    weights = [n / sum(weights) for n in weights]

    def backward(b, w):
        loss, _ = p.loss_fn(b["input_ids"], b["attention_mask"], b["labels"])
        (loss * w).backward()

    singles = []
    for b, w in zip(micro, weights):  # each micro-batch's own bf16 gradient (0 + g: exact in the fp32 buffer)
        backward(b, w)
        singles.append([g.double().clone() for g in p.optimizer.grads])
        p.optimizer.zero_grad()
    for b, w in zip(micro, weights):  # accumulated by the hook, as train_step does
        backward(b, w)
    ours = [g.double().clone() for g in p.optimizer.grads]
    p.optimizer.zero_grad()
    p.optimizer.remove_hooks()  # autograd now sums into the bf16 .grad: the old behaviour
    for b, w in zip(micro, weights):
        backward(b, w)
    bf16_summed = [q.grad.double() for q in p.optimizer.params]
    worst_ours, worst_bf16 = 0.0, 0.0
    for i, got in enumerate(ours):
        exact = sum(s[i] for s in singles)
        bound = 3 * 2.0**-24 * sum(s[i].abs() for s in singles) + 1e-30
        worst_ours = max(worst_ours, float(((got - exact).abs() / bound).max()))
        worst_bf16 = max(worst_bf16, float(((bf16_summed[i] - exact).abs() / bound).max()))
    assert worst_ours <= 1.0, worst_ours
    assert worst_bf16 > 100, worst_bf16  # bf16 has 2^16 x fp32's unit roundoff: the old sum misses the bound


# ---- int8 ----------------------------------------------------------------------------------------------------------


def test_int8_codes_independent_of_input_dtype_and_dequantized_in_fp32():
    from qlora_kit.quant.bnb import QuantSpec, bnbF, dequantize, int8_quantize, quantize

    g = torch.Generator().manual_seed(0)
    w16 = (torch.randn(96, 200, generator=g) * torch.logspace(-2, 1, 96)[:, None]).to(torch.bfloat16)
    w16[5] = 0  # an all-zero row: codes 0, scale 0 (not NaN)
    spec = QuantSpec("int8")
    q = {dt: quantize(w16.to(dt), spec) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    for dt in (torch.bfloat16, torch.float16):  # bf16 values of this range are exact in fp16 and fp32
        assert torch.equal(q[dt]["qweight"], q[torch.float32]["qweight"])
        assert torch.equal(q[dt]["scale"], q[torch.float32]["scale"])
    codes, scale = q[torch.float32]["qweight"], q[torch.float32]["scale"]
    assert not codes[5].any() and scale[5] == 0
    # float64 reference: round(w * 127 / absmax) (ties aside, which fp32 may resolve differently)
    w64 = w16.double()
    a64 = w64.abs().amax(1, keepdim=True)
    ref = torch.round(w64 * 127 / a64.clamp_min(1e-300))
    assert (codes.double() - ref).abs().max() <= 1 and (codes.double() != ref).float().mean() < 1e-3
    assert torch.equal(scale.double(), a64.squeeze(1))  # the scale is the exact absmax, kept in fp32
    # On the CPU our codes are bitwise what bitsandbytes' fp32 kernel gives (no change for CPU runs).
    bq, bs, _ = bnbF.int8_vectorwise_quant(w16.float()[[i for i in range(96) if i != 5]])
    assert torch.equal(bq, codes[[i for i in range(96) if i != 5]])
    # Dequantized in fp32 and rounded once: fp32 within 1 ulp of the float64 product, bf16 = round(fp32 value).
    exact = codes.double() * scale.double()[:, None] / 127
    d32 = dequantize(q[torch.float32], spec, tuple(w16.shape), torch.float32)
    assert ((d32.double() - exact).abs() <= 2.0**-23 * exact.abs()).all()
    d16 = dequantize(q[torch.float32], spec, tuple(w16.shape), torch.bfloat16)
    assert torch.equal(d16, d32.to(torch.bfloat16))
    assert torch.equal(int8_quantize(w16)["qweight"], codes)


# ---- RNG -----------------------------------------------------------------------------------------------------------


def test_cpu_checkpoint_holds_no_cuda_rng_and_resume_touches_no_gpu(tiny_model, tiny_data, tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a CPU run must not touch CUDA RNG state")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "get_rng_state", forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state", forbidden)
    recipe = tiny_recipe(tiny_model, tiny_data, train={"steps": 2, "save_every": 1, "keep_checkpoints": 3})
    train.run(recipe, tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-1" / "state.json").read_text())
    assert [k for k, _ in state["rng"]["__dict__"]] == ["torch", "python"]
    # With CUDA visible, the saved and restored state is the TRAINING device's only.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append(("set", device)))
    cpu = checkpoint.rng_state("cpu")
    assert "cuda" not in cpu
    checkpoint.set_rng_state(cpu, "cpu")
    assert calls == []
    gpu = checkpoint.rng_state(torch.device("cuda", 1))
    checkpoint.set_rng_state(gpu, torch.device("cuda", 1))
    old_style = dict(cpu, cuda=[torch.zeros(8), torch.ones(8)])  # a checkpoint from before: one state per GPU
    checkpoint.set_rng_state(old_style, torch.device("cuda", 0))
    assert calls == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 1)),
                     ("set", torch.device("cuda", 0))]


# ---- 8-bit optimizer state through a checkpoint ----------------------------------------------------------------


def test_eight_bit_state_is_eight_bit_after_resume(tmp_path):
    """Realistic size (r=64 on hidden 2048: A (64, 2048) + B (2048, 64), bf16): bitsandbytes keeps 8-bit state
    (under 4096 elements it would be fp32). Saved and loaded through a real checkpoint, the state is still uint8
    and the next step equals the uninterrupted one bitwise."""
    from qlora_kit.config import TrainConfig
    from qlora_kit.train.optim import build_optimizer

    cfg = TrainConfig(optimizer="adamw8bit", lr=1e-3)

    def make():
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(64, 2048, generator=g) * 0.02).bfloat16()),
                  torch.nn.Parameter(torch.zeros(2048, 64, dtype=torch.bfloat16))]
        return params, build_optimizer(params, cfg)

    def step(params, opt, seed):
        g = torch.Generator().manual_seed(seed)
        for q in params:  # backward's AccumulateGrad, then the optimizer's post-accumulate-grad hook
            q.grad = torch.randn(q.shape, generator=g).bfloat16()
            q._post_accumulate_grad_hooks[next(iter(q._post_accumulate_grad_hooks))](q)
        assert all(q.grad is None for q in params)
        opt.step()
        opt.zero_grad()

    a_params, a = make()
    for s in range(2):
        step(a_params, a, s)
    (state,) = a.inner.state.values()
    assert state["state1"].dtype == torch.uint8 and state["state1"].numel() == 2 * 64 * 2048
    checkpoint.save(tmp_path, 2, {}, a.state_dict(), {}, keep=1)
    _, opt_state, _ = checkpoint.load(checkpoint.latest(tmp_path))
    b_params, b = make()
    b.load_state_dict(opt_state)
    (loaded,) = b.inner.state.values()
    assert loaded["state1"].dtype == torch.uint8 and loaded["state2"].dtype == torch.uint8
    assert torch.equal(loaded["state1"], state["state1"])
    assert all(torch.equal(x, y) for x, y in zip(a_params, b_params))
    step(a_params, a, 7)
    step(b_params, b, 7)
    assert all(torch.equal(x, y) for x, y in zip(a_params, b_params))


# ---- GEMV decode (item 8): the quant state we hand bitsandbytes, checked on the CPU --------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_gemv_4bit_matches_the_dequantized_matmul(double_quant):
    """`quant.gemv_4bit` builds the QuantState bitsandbytes' 4-bit GEMV reads from our buffers; on the CPU its
    kernel must agree with x @ dequant(W)^T + b (bf16 output rounding). QuantLinear takes it only on CUDA."""
    from qlora_kit.quant.bnb import QuantLinear, QuantSpec, gemv_4bit

    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g).bfloat16()
    b = torch.randn(128, generator=g).bfloat16()
    layer = QuantLinear.from_weight(w, QuantSpec("nf4", 64, double_quant), bias=b)
    x = torch.randn(1, 1, 256, generator=g).bfloat16()
    with torch.no_grad():
        ref = x.float() @ layer.dequantize(torch.float32).T + b.float()
        got = gemv_4bit(x, layer)
        assert torch.equal(layer(x), layer(x.clone()))  # CPU: the dequantize path, deterministic
    assert got.shape == (1, 1, 128)
    assert float((got.float() - ref).abs().max()) <= 2**-7 * float(ref.abs().max())  # one bf16 ulp of the largest


# ---- parameter groups (LoRA+) and the DDP mode without hooks --------------------------------------------------------


def test_param_groups_set_lr_and_the_hook_free_mode_agree():
    """Two groups (B at 16x A's rate, LoRA+): one flat master each, set_lr applies the ratios. Without hooks (the
    DDP/FSDP mode) the gradients come from .grad in grads_to_masters and the step is the same, bitwise."""
    from qlora_kit.config import TrainConfig
    from qlora_kit.train.optim import ParamGroup, build_optimizer

    def make(hook):
        g = torch.Generator().manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(4, 32, generator=g).bfloat16()) for _ in range(2)]
        b = [torch.nn.Parameter(torch.randn(32, 4, generator=g).bfloat16()) for _ in range(2)]
        opt = build_optimizer([ParamGroup(a), ParamGroup(b, lr_ratio=16.0)], TrainConfig(lr=1e-3), hook=hook)
        return a + b, opt

    results = []
    for hook in (True, False):
        params, opt = make(hook)
        assert len(opt.flats) == 2 and [len(g["params"]) for g in opt.inner.param_groups] == [1, 1]
        opt.set_lr(1e-3)
        assert [g["lr"] for g in opt.inner.param_groups] == [1e-3, 16e-3]
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
        (sum(((x @ a.T) @ b.T).float().square().sum() for a, b in zip(params[:2], params[2:]))).backward()
        assert all((q.grad is None) == hook for q in params)  # the hook moved them into the flat fp32 buffers
        opt.grads_to_masters()
        opt.step()
        results.append([q.detach().clone() for q in params])
    assert all(torch.equal(x, y) for x, y in zip(*results))
    moved = [float((x.float() - y.detach().float()).abs().mean()) for x, y in zip(results[0], make(True)[0])]
    assert min(moved[2:]) > 8 * max(moved[:2])  # B's group stepped at 16x the rate (Adam: ~lr per element)
