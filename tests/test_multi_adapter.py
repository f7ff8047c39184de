"""Several adapters over one quantized base (multi_lora): a mixed batch equals, row by row, each adapter alone."""

import pytest
import torch

from conftest import tiny_recipe
from qlora_kit.infer import generate
from qlora_kit.data import pipeline as data
from qlora_kit.adapters import lora, multi_lora, peft_format
from qlora_kit.cli.main import main
from qlora_kit.config import ModelConfig, QuantConfig
from qlora_kit.model.load import load_base
from qlora_kit.quant.bnb import QuantLinear

QUANT = QuantConfig(type="nf4", compute_dtype="fp32")  # fp32 compute and fp32 frozen weights: exact comparisons
# name -> (targets, r, alpha, rslora): different target sets, ranks and scales
SPECS = {"a": ("all-linear", 4, 8.0, False), "b": (["q_proj", "v_proj"], 2, 4.0, False),
         "c": (r".*\.(o_proj|down_proj)", 3, 6.0, True)}
PROMPTS = ["What is the capital of Veloria 1?", "hello world", "Paris is in France.", "A quick brown fox jumps",
           "What is the capital of Veloria 7?"]
ROUTES = ["a", "b", None, "c", "a"]  # None: the base alone; "a" twice: a group of several rows


def _base(tiny_model):
    model, tok, _ = load_base(ModelConfig(str(tiny_model), dtype="fp32"), QUANT)
    return model.eval(), tok


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    """Hand-built PEFT adapter folders with non-zero random B (an untrained B = 0 would hide routing mistakes)."""
    out = {}
    for seed, (name, (targets, r, alpha, rslora)) in enumerate(SPECS.items()):
        model, _ = _base(tiny_model)
        lora.inject(model, targets, lora.LoraSpec(r, alpha, 0.0, "kaiming", rslora, torch.float32))
        gen = torch.Generator().manual_seed(seed)
        state = lora.adapter_state_dict(model)
        with torch.no_grad():
            for t in state.values():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
        out[name] = peft_format.save_adapter(tmp_path_factory.mktemp("adapters") / name, state, r=r, alpha=alpha,
                                             dropout=0.0, rslora=rslora, base_model=str(tiny_model))
    return out


def _single(tiny_model, folder):
    """The reference: the base with only this adapter, as lora.LoRALinear (None: the plain base)."""
    model, tok = _base(tiny_model)
    if folder is not None:
        ad = peft_format.load_adapter(folder)
        lora.inject(model, ad.modules(), lora.LoraSpec(ad.r, ad.alpha, 0.0, "kaiming", ad.rslora, torch.float32))
        lora.load_adapter_state(model, ad.tensors)
    return model.eval(), tok


def _multi(tiny_model, adapters):
    model, tok = _base(tiny_model)
    for name, folder in adapters.items():
        ad = peft_format.load_adapter(folder)
        multi_lora.add_adapter(model, name, {m: ad.pair(m) for m in ad.modules()}, ad.alpha, ad.rslora, torch.float32)
    return model.eval(), tok


def _batch(tok):
    return generate.left_pad([data.encode_prompt(p, tok, "alpaca") for p in PROMPTS], data.pad_token_id(tok))


def _until_eos(row, eos):
    row = row.tolist()
    return row[: row.index(eos) + 1] if eos in row else row


@torch.no_grad()
def test_mixed_batch_equals_each_adapter_alone(tiny_model, adapters):
    multi, tok = _multi(tiny_model, adapters)
    x, mask = _batch(tok)
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different lengths: the left padding matters
    with multi_lora.route(multi, ROUTES):
        got = multi(input_ids=x, attention_mask=mask).logits  # (B, T, V) fp32
        got_gen = multi.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 pad_token_id=data.pad_token_id(tok))
    base_logits = None
    eos = tok.eos_token_id
    for name in dict.fromkeys(ROUTES):
        ref, _ = _single(tiny_model, adapters[name] if name else None)
        want = ref(input_ids=x, attention_mask=mask).logits
        want_gen = ref.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=data.pad_token_id(tok))
        if name is None:
            base_logits = want
        for i in (i for i, r in enumerate(ROUTES) if r == name):
            real = mask[i].bool()
            torch.testing.assert_close(got[i, real], want[i, real], atol=1e-5, rtol=1e-5)
            assert torch.equal(got_gen[i], want_gen[i]), name  # same padded batch: bitwise-equal greedy tokens
            ids = torch.tensor([data.encode_prompt(PROMPTS[i], tok, "alpaca")])  # and the prompt alone, unpadded
            alone = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=data.pad_token_id(tok))
            assert _until_eos(got_gen[i, x.shape[1]:], eos) == _until_eos(alone[0, ids.shape[1]:], eos), name
    for i, r in enumerate(ROUTES):  # not vacuous: each adapter moves the logits of its rows a lot
        diff = (got[i, mask[i].bool()] - base_logits[i, mask[i].bool()]).abs().max()
        assert (diff > 0.1) if r else (diff < 1e-5), (r, float(diff))


def test_base_is_loaded_once_and_shared(tiny_model, adapters):
    model, _ = _base(tiny_model)
    before = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, folder in adapters.items():
        ad = peft_format.load_adapter(folder)
        multi_lora.add_adapter(model, name, {m: ad.pair(m) for m in ad.modules()}, ad.alpha, ad.rslora, torch.float32)
    after = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(after) == len(before) == 14  # 2 layers x 7 Linears: one quantized copy, however many adapters
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, multi_lora.MultiLoRALinear)}
    assert len(wrapped) == 14
    assert all(m.base is before[n] for n, m in wrapped.items())  # the very module load_base made
    q, o = wrapped["model.layers.0.self_attn.q_proj"], wrapped["model.layers.1.self_attn.o_proj"]
    assert q.adapters() == ["a", "b"] and o.adapters() == ["a", "c"]
    assert q.lora_A["a"].weight.shape == (4, 64) and q.lora_B["b"].weight.shape == (64, 2)
    assert "model.layers.0.self_attn.q_proj.lora_A.b.weight" in dict(model.named_parameters())  # PEFT's layout
    assert not any(p.requires_grad for p in model.parameters())
    assert multi_lora.adapters(model) == ["a", "b", "c"]
    with pytest.raises(KeyError, match="no adapter named 'z'"):
        with multi_lora.route(model, ["a", "z"]):
            pass
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), multi_lora.route(model, "b", batch_size=1):  # one name for every row
        one = model(input_ids=x).logits
    with torch.no_grad(), multi_lora.route(model, ["b"]):
        assert torch.equal(one, model(input_ids=x).logits)
    with pytest.raises(RuntimeError, match="outside multi_lora.route"):
        model(input_ids=x)
    with pytest.raises(RuntimeError, match="the route names 2"):
        with multi_lora.route(model, ["a", "b"]):
            model(input_ids=x)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, tiny_data):
    from qlora_kit.train import loop as train

    run = tmp_path_factory.mktemp("multi") / "run"
    train.run(tiny_recipe(tiny_model, tiny_data, train={"steps": 2, "save_every": 0}), run, progress=False)
    return run


Q1, Q2, Q3 = "What is the capital of Veloria 1?", "hello world", "Paris is in France."


def test_load_many_answers_equal_single_adapter_answers(tiny_model, adapters, tiny_run):
    """Default dtypes (bf16 frozen weights, nf4 with bf16 compute), a run folder among PEFT folders: one batched call
    gives each row the greedy answer of that adapter loaded alone by the single-adapter path."""
    many = generate.load_many(str(tiny_run), {"a": str(adapters["a"]), "b": str(adapters["b"]), "run": str(tiny_run)})
    assert sum(isinstance(m, QuantLinear) for m in many.model.modules()) == 14
    prompts, routes = [Q1, Q2, Q3, Q1, Q2], ["a", "b", None, "run", "a"]
    got = generate.answer_routed(many, prompts, routes, max_new_tokens=6)
    alone = {"a": generate.load(str(adapters["a"])), "b": generate.load(str(adapters["b"])),
             "run": generate.load(str(tiny_run)),
             None: generate.load(str(tiny_model), quant=QuantConfig())}  # the base as load_many holds it: nf4
    want = [generate.answer(alone[r], [p], max_new_tokens=6)[0] for p, r in zip(prompts, routes)]
    assert got == want
    assert got[0] != generate.answer(alone[None], [Q1], max_new_tokens=6)[0]  # not vacuous: a changes the answer


def test_cli_mixed_prompts(tiny_model, adapters, tiny_run, capsys):
    args = ["generate", str(tiny_run), "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
            "--adapter", f"run={tiny_run}", "--prompt", f"a: {Q1}", "--prompt", f"b:{Q2}", "--prompt", f"base: {Q3}",
            "--prompt", f"*: {Q2}", "--max-new-tokens", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    many = generate.load_many(str(tiny_run), {"a": str(adapters["a"]), "b": str(adapters["b"]), "run": str(tiny_run)})
    generate.speed_up(many, merge=False)  # the CLI decodes on the CPU fast path (fp32, adapters kept separate)
    ans = generate.answer_routed(many, [Q1, Q2, Q3, Q2, Q2, Q2, Q2], ["a", "b", None, "a", "b", "run", None], 6)
    assert out == (f"> a: {Q1}\n{ans[0]}\n> b: {Q2}\n{ans[1]}\n> base: {Q3}\n{ans[2]}\n> *: {Q2}\n"
                   f"  a    : {ans[3]}\n  b    : {ans[4]}\n  run  : {ans[5]}\n  base : {ans[6]}\n")
    assert main(args[:8] + ["--prompt", f"a: {Q1}", "--compare-base", "--max-new-tokens", "6"]) == 0
    base_q1 = generate.answer_routed(many, [Q1], [None], 6)[0]
    assert capsys.readouterr().out == f"> a: {Q1}\n  a    : {ans[0]}\n  base : {base_q1}\n"


def test_cli_bad_adapters_exit_2(tiny_model, adapters, tmp_path, capsys):
    def save(name, tensors):
        return peft_format.save_adapter(tmp_path / name, tensors, r=2, alpha=4, dropout=0.0, rslora=False,
                                        base_model=str(tiny_model))

    q = "model.layers.0.self_attn.q_proj"
    wrong_shape = save("wrong_shape", {f"{q}.lora_A.weight": torch.ones(2, 32),  # in_features 64, not 32
                                       f"{q}.lora_B.weight": torch.ones(64, 2)})
    wrong_module = save("wrong_module", {"model.layers.9.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
                                         "model.layers.9.self_attn.q_proj.lora_B.weight": torch.ones(64, 2)})
    a = f"a={adapters['a']}"
    cases = [
        (["--adapter", f"x={wrong_shape}", "--prompt", "x: hi"], "do not fit"),
        (["--adapter", f"x={wrong_module}", "--prompt", "x: hi"], "does not have"),
        (["--adapter", f"x={tmp_path / 'nope'}", "--prompt", "x: hi"], "not a PEFT adapter folder"),
        (["--adapter", a, "--prompt", "z: hi"], "start each prompt"),
        (["--adapter", a, "--prompt", "no prefix here"], "start each prompt"),
        (["--adapter", a, "--adapter", a, "--prompt", "a: hi"], "given twice"),
        (["--adapter", f"base={adapters['a']}", "--prompt", "a: hi"], "reserved"),
        (["--adapter", str(adapters["a"]), "--prompt", "a: hi"], "NAME=PATH"),
    ]
    for args, msg in cases:
        rc = main(["generate", str(tiny_model), *args, "--max-new-tokens", "2"])
        out, err = capsys.readouterr()
        assert rc == 2 and msg in err and "Traceback" not in err and not out, (args, err)
