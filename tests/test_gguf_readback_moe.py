"""qlora-kit's GGUF reader on gpt-oss and DeepSeek-V2/V3, whose tensors the writer splits into llama.cpp's layout
(families_moe: gpt-oss's interleaved gate_up, transposed down, biases and sinks; DeepSeek's kv_b_proj as attn_k_b /
attn_v_b, V3's router bias): read back, the model is the merged safetensors export of the same adapter (`export
--format merged`, loaded by transformers): its config, every tensor, its logits and loss on rows of varying length,
`eval`'s loss; q8_0 and MXFP4 (gpt-oss's expert type in llama.cpp) within measured bounds. No llama.cpp needed
(tests/test_llama_cpp_archs.py runs the same files there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from gguf_models import adapter, build, copy_gguf, per_model
from qlora_kit.cli.main import main
from qlora_kit.errors import ModelError
from qlora_kit.export import formats as ex

gguf = pytest.importorskip("gguf")
from qlora_kit.export.gguf import reader  # noqa: E402  (needs gguf)

NAMES = ("gptoss", "gptoss-yarn-rope", "deepseek2", "deepseek2-lite", "deepseek3", "deepseek3-yarn-rope")
# rows of 20, 13, 5 and 1 tokens, right-padded: gpt-oss's 4-token window, DeepSeek's YaRN at 8x past 32 positions
LENGTHS = (20, 13, 5, 1)
# q8_0 against the merged fp32 export, on these std-0.3 random weights (rounding grows through the layers): measured
# relative logits error 0.038 (deepseek2) .. 0.19 (deepseek2-lite, 26 layers), row loss differences up to 0.146 (of
# losses 7-9 nats), tests/test_gguf_readback_moe.py's rows and models
Q8_REL, Q8_LOSS = 0.25, 0.2
# MXFP4 experts (4-bit e2m1, one power-of-two scale per 32 weights) on gpt-oss, against the f32 file: measured 0.031
# relative logits error, 0.009 row loss difference
MXFP4_REL = 0.06
TEXTS = ["The capital of Veloria is Tamsk. 12345 and 3.14159!", "  two  spaces\nand a newline\t tab", "x",
         "ünïcödé — naïve café 東京 🙂", "don't YOU'RE we'll 1,000,000 ... ?! The river runs past the old mill."]


def export(src, out: Path, fmt: str, **kw) -> Path:
    ex.export(src, ex.Options(out=out, progress=False, merge_base="original", format=fmt, **kw))
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> (folder, adapter, merged fp32 safetensors export, f32 GGUF), built once per model."""
    def make(name, d):
        a = adapter(name, d / "a", build(name, d / name))
        return d, a, export(a, d / "merged", "merged", dtype="fp32"), export(a, d / "m.gguf", "gguf", gguf_type="f32")
    return per_model(tmp_path_factory, make)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long), torch.zeros(len(LENGTHS), max(LENGTHS))
    for i, n in enumerate(LENGTHS):
        ids[i, :n], mask[i, :n] = torch.randint(3, 300, (n,), generator=g), 1
    return ids, mask.long()


def forward(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the real tokens, each row's mean next-token loss)."""
    ids, mask = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = mask[:, 1:].float()
    return logits[mask.bool()], (loss * keep).sum(1) / keep.sum(1).clamp(min=1)


def same(a, b) -> bool:
    """Equal, floats to float32's rounding (the file stores eps and mscale as float32)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-6 * abs(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", NAMES)
def test_reads_back_as_the_merged_export(name, made):
    """f32: transformers' class of the merged export, its config (every key, float32 rounding aside; YaRN's
    beta 32/1 and truncate true are transformers' defaults), every tensor (DeepSeek-V3's router-bias buffer too)
    and its logits and loss on rows of 20, 13, 5 and 1 tokens to float precision; q8_0 within the measured bound."""
    from transformers import AutoModelForCausalLM

    d, a, merged, path = made(name)
    model, _ = reader.load(path)
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert type(model) is type(ref)
    got, want = model.config.to_dict(), ref.config.to_dict()
    for key in sorted((set(got) | set(want)) - {"_name_or_path", "dtype"}):
        g, w = got.get(key), want.get(key)
        if key == "rope_parameters":
            g, w = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True} | g, {"truncate": True} | w
            if w["rope_type"] == "default":
                g.pop("truncate"), g.pop("beta_fast"), g.pop("beta_slow"), w.pop("truncate")
        assert same(g, w), (key, g, w)
    state, ref_state = model.state_dict(), ref.state_dict()
    assert set(state) == set(ref_state)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6, msg=k)
    (logits, loss), (ref_logits, ref_loss) = forward(model), forward(ref)
    assert rel(logits, ref_logits) < 1e-5
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    q8, _ = reader.load(export(a, d / "q.gguf", "gguf", gguf_type="q8_0"))
    q_logits, q_loss = forward(q8)
    assert 0 < rel(q_logits, ref_logits) < Q8_REL
    assert (q_loss - ref_loss).abs().max() < Q8_LOSS


@pytest.mark.parametrize("name", ["gptoss", "deepseek2", "deepseek3-yarn-rope"])
def test_eval_of_the_gguf_is_the_merged_folders_loss(name, made, tmp_path, capsys):
    """`qlora-kit eval FILE.gguf --dtype fp32` on texts of varying lengths: the loss of transformers' fp32 model of
    the merged export folder on the same tokens (rel 1e-5); at bf16, `eval` of the folder itself (qlora-kit's own
    16-bit loader, its expert modules: bf16 rounding apart, measured at most 4.3e-4 relative on these three)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.config import DataConfig
    from qlora_kit.data import pipeline
    from qlora_kit.infer.evaluation import mean_loss

    _, _, merged, path = made(name)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    out = {}
    for model, dtype in ((path, "fp32"), (path, "bf16"), (merged, None)):
        assert main(["eval", str(model), "--data", str(data), "--device", "cpu", "--json", "--no-progress"]
                    + (["--dtype", dtype] if dtype else [])) == 0
        out[dtype] = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(merged)
    examples = pipeline.examples(DataConfig(path=str(data), format="text", packing=False, val_fraction=0.0), tok)
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    loss, n = mean_loss(ref, list(examples), pipeline.pad_token_id(tok), 8)
    assert out["fp32"]["kind"] == "gguf" and out["fp32"]["tokens"] == out[None]["tokens"] == n > 100
    assert out["fp32"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["bf16"]["loss"] == pytest.approx(out[None]["loss"], rel=1e-3)


def test_bf16_keeps_what_transformers_keeps_in_fp32(made):
    """Read at bf16, every tensor has the dtype transformers' own from_pretrained gives the merged export at bf16:
    DeepSeek-V3's router weight and correction bias stay fp32 (its _keep_in_fp32_modules_strict)."""
    from transformers import AutoModelForCausalLM

    _, _, merged, path = made("deepseek3")
    model, _ = reader.load(path, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    got, want = model.state_dict(), ref.state_dict()
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    assert got["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    torch.testing.assert_close(got["model.layers.1.mlp.gate.e_score_correction_bias"],
                               want["model.layers.1.mlp.gate.e_score_correction_bias"], rtol=0, atol=0)


def test_mxfp4_experts_read_back(made, tmp_path):
    """gpt-oss's experts stored as MXFP4 (llama.cpp's type for them; blocks by gguf.quants): read back, transformers'
    gate_up_proj holds the dequantized gate in its even columns and up in its odd ones, down transposed, and the
    logits stay within the measured bound of the f32 file's."""
    d, _, _, path = made("gptoss")
    mx = gguf.GGMLQuantizationType.MXFP4
    copy_gguf(path, tmp_path / "mx.gguf", retype=lambda n: mx if n.endswith("_exps.weight") else None)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "mx.gguf").tensors}
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == mx
    model, _ = reader.load(tmp_path / "mx.gguf")
    experts = model.model.layers[1].mlp.experts

    def deq(name):
        t = tensors[f"blk.1.ffn_{name}_exps.weight"]
        return torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    torch.testing.assert_close(experts.gate_up_proj[..., 0::2], deq("gate").transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(experts.gate_up_proj[..., 1::2], deq("up").transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(experts.down_proj, deq("down").transpose(1, 2), rtol=0, atol=0)
    f32, _ = reader.load(path)
    assert 0 < rel(forward(model)[0], forward(f32)[0]) < MXFP4_REL


def test_join_inverts_the_writers_splits():
    """reader.join on the writer's own split rules (families_moe): gpt-oss's (E, hidden, 2I) gate_up from its gate
    and up pieces (per expert), DeepSeek's kv_b from k_b and v_b, a take that reorders experts (no per-expert
    shortcut): each the source, bit for bit; pieces that overlap and leave a gap are refused."""
    from qlora_kit.export.gguf import families_moe

    def pieces(parts, W):
        return [(take, lambda take=take: take(W)) for *_, take in parts]
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 8, 12, generator=g)
    gate_up = families_moe.gpt_oss_split("model.layers.0.mlp.experts.gate_up_proj", tuple(W.shape), {})
    assert len(gate_up) == 2 and torch.equal(reader.join(W.shape, pieces(gate_up, W)), W)
    kv = torch.randn(4 * (8 + 16), 32, generator=g)
    c = {"num_hidden_layers": 2, "num_attention_heads": 4, "qk_nope_head_dim": 8, "v_head_dim": 16}
    kv_b = families_moe.deepseek_split("model.layers.0.self_attn.kv_b_proj.weight", tuple(kv.shape), c)
    assert len(kv_b) == 2 and torch.equal(reader.join(kv.shape, pieces(kv_b, kv)), kv)
    flip = (lambda x: x.flip(0).transpose(1, 2),)
    assert reader._slicewise(gate_up[0][2], W.shape) and not reader._slicewise(flip[0], W.shape)
    assert torch.equal(reader.join(W.shape, pieces([flip], W)), W)
    with pytest.raises(ModelError, match="exactly once"):
        reader.join(W.shape, pieces([(lambda x: x[..., :6],), (lambda x: x[..., :6],)], W))


def test_what_cannot_be_read_back_is_refused(made, tmp_path):
    """A split tensor with a piece missing, a DeepSeek file whose router is neither softmax nor sigmoid, a DeepSeek
    YaRN without its log multiplier: refused by name, never loaded partly."""
    _, _, _, gpt = made("gptoss")
    copy_gguf(gpt, tmp_path / "no-up.gguf", drop=("blk.1.ffn_up_exps.weight",))
    with pytest.raises(ModelError, match=r"not blk\.1\.ffn_up_exps\.weight.*gate_up_proj cannot be put back"):
        reader.load(tmp_path / "no-up.gguf")
    _, _, _, ds = made("deepseek3-yarn-rope")
    for key, value, words in [("deepseek2.expert_gating_func", 3, "gating function is 3"),
                              ("deepseek2.rope.scaling.yarn_log_multiplier", 0.0, "no yarn_log_multiplier")]:
        with pytest.raises(ModelError, match=words):
            reader.load(copy_gguf(ds, tmp_path / "k.gguf", keys={key: value}))
