"""GGUF export of gpt-oss and DeepSeek-V2/V3 checked without llama.cpp: tensors read back with the gguf package
against the checkpoint's own tensors and PEFT's merge (the layouts llama.cpp's converter writes), the keys its
graphs read, the refusals, the harmony Modelfile and the o200k pre-tokenizer name. llama.cpp runs the same files in
tests/test_llama_cpp_archs.py when the extra is installed; qlora-kit's reader reads them back in
tests/test_gguf_readback_moe.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CORPUS
from gguf_models import adapter, build, peft_merged
from qlora_kit.errors import ExportError
from qlora_kit.export import formats as ex
from qlora_kit.export.gguf import ollama

gguf = pytest.importorskip("gguf")


def export(src, out, **kw):
    return ex.export(src, ex.Options(out=Path(out), progress=False, merge_base="original",
                                     **{"format": "gguf", **kw}))


def read(path: Path) -> tuple[dict, dict, dict]:
    """(fields, {name: float64 array in numpy (outer, ..., inner) order}, {name: type name})."""
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    data = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
            .reshape([int(x) for x in t.shape[::-1]]) for t in r.tensors}
    return fields, data, {t.name: t.tensor_type.name for t in r.tensors}


def checkpoint(base: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(base / "model.safetensors").items()}


def test_gpt_oss_experts_sinks_and_keys(tmp_path):
    """gpt-oss's fused experts are written per kind and expert as (out, in) matrices: gate = the even columns of
    gate_up_proj (transformers' gate_up[..., ::2]), up = the odd ones, down transposed, biases split alike and kept
    f32 at q8_0; the sinks, the merged attention (PEFT's merge) and the keys of llama.cpp's gpt-oss graph."""
    base = build("gptoss", tmp_path / "base")
    a = adapter("gptoss", tmp_path / "a", base)
    export(a, tmp_path / "m.gguf", gguf_type="f32")
    export(a, tmp_path / "q.gguf", gguf_type="q8_0")
    fields, data, _ = read(tmp_path / "m.gguf")
    hf = checkpoint(base)
    merged = {k: v.double() for k, v in peft_merged(base, a).state_dict().items()}
    for i in range(2):
        p = f"model.layers.{i}."
        gate_up, bias = hf[p + "mlp.experts.gate_up_proj"], hf[p + "mlp.experts.gate_up_proj_bias"]
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_gate_exps.weight"], gate_up[..., ::2].transpose(1, 2))
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_up_exps.weight"], gate_up[..., 1::2].transpose(1, 2))
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_down_exps.weight"],
                                      hf[p + "mlp.experts.down_proj"].transpose(1, 2))
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_gate_exps.bias"], bias[:, ::2])
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_up_exps.bias"], bias[:, 1::2])
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_down_exps.bias"], hf[p + "mlp.experts.down_proj_bias"])
        np.testing.assert_array_equal(data[f"blk.{i}.attn_sinks.weight"], hf[p + "self_attn.sinks"])
        np.testing.assert_allclose(data[f"blk.{i}.attn_q.weight"], merged[p + "self_attn.q_proj.weight"], atol=1e-6)
        np.testing.assert_array_equal(data[f"blk.{i}.ffn_gate_inp.bias"], hf[p + "mlp.router.bias"])
    assert fields["gpt-oss.expert_count"] == 4 and fields["gpt-oss.expert_used_count"] == 2
    assert fields["gpt-oss.expert_feed_forward_length"] == 32 and fields["gpt-oss.attention.sliding_window"] == 4
    assert fields["gpt-oss.attention.head_count_kv"] == 2 and fields["gpt-oss.attention.key_length"] == 16
    _, qdata, types = read(tmp_path / "q.gguf")
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_exps.bias"] == "F32" and types["blk.0.attn_sinks.weight"] == "F32"
    w, q = data["blk.1.ffn_down_exps.weight"], qdata["blk.1.ffn_down_exps.weight"]
    assert 0 < np.abs(w - q).max() <= np.abs(w).max() / 127  # Q8_0: one step of a block's scale at most


@pytest.mark.parametrize("name", ["deepseek3", "deepseek2"])
def test_deepseek_latent_attention_layout(name, tmp_path):
    """kv_b_proj (merged with its LoRA, as PEFT merges it) is written as llama.cpp's attn_k_b (per head: the k rows
    transposed) and attn_v_b (the v rows), no attn_kv_b; one kv head with the latent's key/value lengths; the first
    layer dense, the others experts with shared ones; the router keys of transformers' V2/V3 routers."""
    base = build(name, tmp_path / "base")
    a = adapter(name, tmp_path / "a", base)
    export(a, tmp_path / "m.gguf", gguf_type="f32")
    fields, data, _ = read(tmp_path / "m.gguf")
    config = json.loads((base / "config.json").read_text())
    merged = {k: v.double() for k, v in peft_merged(base, a).state_dict().items()}
    heads, nope, v, rank = 4, 8, 16, 32
    for i in range(2):
        kv_b = merged[f"model.layers.{i}.self_attn.kv_b_proj.weight"].reshape(heads, nope + v, rank)
        np.testing.assert_allclose(data[f"blk.{i}.attn_k_b.weight"], kv_b[:, :nope].transpose(1, 2), atol=1e-6)
        np.testing.assert_allclose(data[f"blk.{i}.attn_v_b.weight"], kv_b[:, nope:], atol=1e-6)
        np.testing.assert_allclose(data[f"blk.{i}.attn_q_a.weight"],
                                   merged[f"model.layers.{i}.self_attn.q_a_proj.weight"], atol=1e-6)
        assert f"blk.{i}.attn_kv_b.weight" not in data
    assert "blk.0.ffn_gate.weight" in data and "blk.0.ffn_gate_exps.weight" not in data
    assert data["blk.1.ffn_gate_exps.weight"].shape == (4, 32, 64) and "blk.1.ffn_up_shexp.weight" in data
    k = "deepseek2."
    assert fields[k + "attention.head_count_kv"] == 1 and fields[k + "attention.kv_lora_rank"] == rank
    assert fields[k + "attention.key_length"] == rank + 8 and fields[k + "attention.value_length"] == rank
    assert fields[k + "attention.key_length_mla"] == nope + 8 and fields[k + "attention.value_length_mla"] == v
    assert fields[k + "rope.dimension_count"] == 8 and fields[k + "attention.q_lora_rank"] == 32
    assert fields[k + "leading_dense_block_count"] == 1 and fields[k + "expert_count"] == 4
    assert fields[k + "expert_shared_count"] == config["n_shared_experts"]
    assert fields[k + "expert_weights_scale"] == pytest.approx(config["routed_scaling_factor"])
    if name == "deepseek3":  # sigmoid + correction bias, group-limited, renormalised
        assert fields[k + "expert_gating_func"] == 2 and fields[k + "expert_weights_norm"] is True
        assert fields[k + "expert_group_count"] == 2 and fields[k + "expert_group_used_count"] == 1
        np.testing.assert_array_equal(data["blk.1.exp_probs_b.bias"],
                                      checkpoint(base)["model.layers.1.mlp.gate.e_score_correction_bias"])
    else:  # softmax, top-k as is
        assert fields[k + "expert_gating_func"] == 1 and k + "expert_weights_norm" not in fields


def changed(name: str, tmp_path: Path, change: dict) -> tuple[Path, Path]:
    """(the tiny model, a copy of it whose config.json has `change` applied): the adapter trained on the first
    fits the second, whose config the export reads."""
    orig = build(name, tmp_path / "orig")
    base = tmp_path / "base"
    base.mkdir()
    for f in orig.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | change))
    return orig, base


@pytest.mark.parametrize("name, change, message", [
    ("gptoss", {"swiglu_limit": 5.0}, "limit 7"),
    ("gptoss", {"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window pattern 2"),
    ("deepseek2", {"q_lora_rank": None}, "layer count"),
    ("deepseek2", {"norm_topk_prob": True}, "never renormalises"),
    ("deepseek2", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}, "top-2 sum"),
    ("deepseek3", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                                       "mscale_all_dim": 0.707, "original_max_position_embeddings": 64}},
     "mscale == mscale_all_dim"),
])
def test_what_llama_cpp_hard_codes_is_refused(name, change, message, tmp_path):
    """A config llama.cpp's graph would run differently from transformers is refused by name, nothing written."""
    orig, base = changed(name, tmp_path, change)
    with pytest.raises(ExportError, match=message):
        ex.export(adapter(name, tmp_path / "a", orig, targets=("o_proj",)),
                  ex.Options("gguf", tmp_path / "m.gguf", base=str(base), progress=False))
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("name, change, groups", [
    ("deepseek3", {}, (2, 1)),  # V3 keeping 1 of 2 groups: llama.cpp's group limit
    ("deepseek3", {"n_group": 2, "topk_group": 2}, None),  # every group kept: no limit
    ("deepseek2", {"n_group": 2, "topk_group": 1}, None),  # V2's greedy router ignores the groups
])
def test_expert_groups_written_only_where_transformers_limits_them(name, change, groups, tmp_path):
    """llama.cpp limits the experts to the best groups (top-2 sum) whenever expert_group_count > 1 is in the file
    (llama-graph.cpp's build_moe_ffn, any architecture): a config whose router does not limit groups in transformers
    must not carry the count, or llama.cpp would route its tokens to other experts."""
    orig, base = changed(name, tmp_path, change)
    out = tmp_path / "m.gguf"
    ex.export(adapter(name, tmp_path / "a", orig, targets=("o_proj",)),
              ex.Options("gguf", out, base=str(base), gguf_type="f32", progress=False))
    fields = read(out)[0]
    got = (fields.get("deepseek2.expert_group_count"), fields.get("deepseek2.expert_group_used_count"))
    assert got == (groups or (None, None))


@pytest.mark.parametrize("targets, message", [(("q_a_proj", "o_proj"), "only to attn_output"),
                                              (("kv_b_proj",), "attn_k_b.weight and .*attn_v_b.weight, reshaped")])
def test_deepseek_adapter_gguf_only_where_llama_cpp_applies_it(targets, message, tmp_path):
    """llama.cpp's deepseek2 graph multiplies q_a/q_b/q/kv_a without its LoRA path (measured: an adapter GGUF on
    them left its output unchanged), and kv_b_proj becomes two reshaped tensors: such adapters are refused for
    --format gguf-adapter (the merged GGUF takes them); o_proj alone goes through."""
    base = build("deepseek3", tmp_path / "base")
    with pytest.raises(ExportError, match=message):
        export(adapter("deepseek3", tmp_path / "a", base, targets=targets), tmp_path / "l.gguf",
               format="gguf-adapter", gguf_type="f32")
    export(adapter("deepseek3", tmp_path / "o", base, targets=("o_proj",)), tmp_path / "o.gguf",
           format="gguf-adapter", gguf_type="f32")
    _, data, _ = read(tmp_path / "o.gguf")
    assert set(data) == {f"blk.{i}.attn_output.weight.lora_{x}" for i in range(2) for x in "ab"}


def test_deepseek_lora_on_mlps_and_experts_is_peft_s(tmp_path):
    """DeepSeek-V2 with LoRA on o_proj, the dense first layer's MLP, the shared experts and every routed expert: the
    merged f32 GGUF's attn_output, ffn_*, ffn_*_shexp and ffn_*_exps are PEFT's merge (transformers' fused experts,
    gate_up_proj rows [gate; up]); the adapter GGUF holds a pair for exactly those weights, the ones llama.cpp's
    deepseek2 graph multiplies through its LoRA path, and base + alpha / r · B @ A is PEFT's merge of each."""
    from transformers import AutoModelForCausalLM

    base = build("deepseek2", tmp_path / "base")
    a = adapter("deepseek2", tmp_path / "a", base, targets=("o_proj", "gate_proj", "up_proj", "down_proj"),
                experts=True)
    export(a, tmp_path / "m.gguf", gguf_type="f32")
    export(a, tmp_path / "l.gguf", format="gguf-adapter", gguf_type="f32")
    (_, stored, _), (_, lora, _) = read(tmp_path / "m.gguf"), read(tmp_path / "l.gguf")
    peft = {k: v.detach().double().numpy() for k, v in peft_merged(base, a).named_parameters()}
    orig = {k: v.detach().double().numpy()
            for k, v in AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).named_parameters()}
    i, e = 32, "model.layers.1.mlp.experts."  # moe_intermediate_size; layer 0 is dense (first_k_dense_replace)
    where = {f"blk.{n}.attn_output.weight": (f"model.layers.{n}.self_attn.o_proj.weight", slice(None))
             for n in range(2)}
    for k in ("gate", "up", "down"):
        where[f"blk.0.ffn_{k}.weight"] = (f"model.layers.0.mlp.{k}_proj.weight", slice(None))
        where[f"blk.1.ffn_{k}_shexp.weight"] = (f"model.layers.1.mlp.shared_experts.{k}_proj.weight", slice(None))
    where |= {"blk.1.ffn_gate_exps.weight": (e + "gate_up_proj", slice(0, i)),
              "blk.1.ffn_up_exps.weight": (e + "gate_up_proj", slice(i, 2 * i)),
              "blk.1.ffn_down_exps.weight": (e + "down_proj", slice(None))}
    assert set(lora) == {f"{n}.lora_{x}" for n in where for x in "ab"}
    for name, (hf, rows) in where.items():
        want, before = peft[hf][..., rows, :], orig[hf][..., rows, :]
        A, B = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert A.shape[-2] == B.shape[-1] == 4 and A.shape[:-2] == B.shape[:-2] == want.shape[:-2], name
        assert np.allclose(stored[name], want, atol=1e-5), name
        assert np.allclose(before + 8.0 / 4 * B @ A, want, atol=1e-5), name
        assert not np.allclose(before, want, atol=1e-2), name  # the adapter changed it


def o200k_tokenizer():
    """A 300-token byte-level BPE splitting text with the o200k regex (gpt-oss's tokenizer.json pre-tokenizer),
    and a harmony-style chat template marker."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qlora_kit.export.gguf.vocab import GPT4O_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4O_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>", "<|call|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|return|>", pad_token="<|endoftext|>",
                                   bos_token="<|start|>")
    fast.chat_template = ("{% for m in messages %}<|start|>{{ m['role'] }}<|channel|>final<|message|>"
                          "{{ m['content'] }}<|end|>{% endfor %}")
    return fast


def test_gpt_oss_o200k_pretokenizer_and_harmony_modelfile(tmp_path):
    """The o200k split is written as llama.cpp's `gpt-4o` pre-tokenizer; a harmony chat template gets the harmony
    TEMPLATE (stops <|return|>, <|call|>) whose text, filled in as Ollama fills it for a system prompt and one user
    turn, is the prompt of OpenAI's harmony format."""
    base = build("gptoss", tmp_path / "base", tokenizer=o200k_tokenizer())
    export(adapter("gptoss", tmp_path / "a", base), tmp_path / "m.gguf", gguf_type="f32")
    fields, _, _ = read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.pre"] == "gpt-4o"
    text = (tmp_path / "m.Modelfile").read_text()
    assert 'PARAMETER stop "<|return|>"' in text and 'PARAMETER stop "<|call|>"' in text
    template, _, _ = ollama.prompt_format({"chat_template": fields["tokenizer.chat_template"]})
    assert template == ollama.HARMONY and f'TEMPLATE """{template}"""' in text
    loop = '{{- range .Messages }}{{ if eq .Role "assistant" }}'
    filled = (template.replace("{{ currentDate }}", "2026-12-07").replace("{{- if .System }}", "")
              .replace("{{ .System }}", "Answer briefly.").replace(loop, "<assistant>"))
    user = filled.index('{{ else if eq .Role "user" }}')
    filled = filled[: filled.index("<assistant>")] + filled[user:].replace('{{ else if eq .Role "user" }}', "", 1)
    filled = filled.replace("{{ .Content }}", "What is 2+2?").replace("{{ end }}", "")
    assert filled == (  # OpenAI's harmony format: system message, developer instructions, user turn, assistant cue
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: "
        "2024-06\nCurrent date: 2026-12-07\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. "
        "Channel must be included for every message.<|end|><|start|>developer<|message|># Instructions\n\n"
        "Answer briefly.\n\n<|end|><|start|>user<|message|>What is 2+2?<|end|><|start|>assistant")


@pytest.mark.parametrize("name, arch, log_mul", [("deepseek3-yarn-rope", "deepseek2", 0.0707),
                                                 ("gptoss-yarn-rope", "gpt-oss", None)])
def test_yarn_keys(name, arch, log_mul, tmp_path):
    """YaRN as llama.cpp reads it: type, factor, original context; DeepSeek's mscale_all_dim as the converter
    writes it (0.1 · mscale_all_dim, which llama.cpp's deepseek2 graph squares into its attention scale)."""
    base = build(name, tmp_path / "base")
    export(adapter(name, tmp_path / "a", base, targets=("o_proj",)), tmp_path / "m.gguf", gguf_type="f32")
    fields, _, _ = read(tmp_path / "m.gguf")
    assert fields[f"{arch}.rope.scaling.type"] == "yarn" and fields[f"{arch}.rope.scaling.factor"] == 8.0
    assert fields[f"{arch}.rope.scaling.original_context_length"] == 32
    assert fields.get(f"{arch}.rope.scaling.yarn_log_multiplier") == (pytest.approx(log_mul) if log_mul else None)


def test_gpt_oss_expert_lora_merged_and_as_adapter(tmp_path):
    """LoRA on every gpt-oss expert (training's (2I, H) gate_up_proj slices, gate/up rows interleaved): the merged
    GGUF's ffn_gate_exps / ffn_up_exps / ffn_down_exps are PEFT's merge into transformers' fused (E, H, 2I) tensors,
    de-interleaved; the adapter GGUF's stacked lora_a (E, r, in) / lora_b (E, out, r), multiplied out and scaled
    by alpha / r, are PEFT's delta on those rows (lora_b's rows 0::2 gate, 1::2 up)."""
    base = build("gptoss", tmp_path / "base")
    a = adapter("gptoss", tmp_path / "a", base, experts=True)
    export(a, tmp_path / "m.gguf", gguf_type="f32")
    export(a, tmp_path / "l.gguf", format="gguf-adapter", gguf_type="f32")
    _, data, _ = read(tmp_path / "m.gguf")
    _, lora, _ = read(tmp_path / "l.gguf")
    hf = checkpoint(base)
    merged = {k: v.double() for k, v in peft_merged(base, a).state_dict().items()}
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts."
        for kind, cut in (("gate", lambda W: W[..., ::2]), ("up", lambda W: W[..., 1::2]), ("down", None)):
            proj = "down_proj" if kind == "down" else "gate_up_proj"
            want, orig = ((cut(t[p + proj]) if cut else t[p + proj]).transpose(1, 2) for t in (merged, hf))
            name = f"blk.{i}.ffn_{kind}_exps.weight"
            np.testing.assert_allclose(data[name], want, atol=1e-6)
            delta = np.einsum("eor,eri->eoi", lora[name + ".lora_b"], lora[name + ".lora_a"]) * 8.0 / 4
            np.testing.assert_allclose(delta, want - orig, atol=1e-6)
            assert np.abs(want - orig).max() > 0.05, name  # the adapter moved every kind
    assert lora["blk.0.ffn_gate_exps.weight.lora_b"].shape == (4, 32, 4)


YARN_RELEASED = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}  # every released gpt-oss config.json
YARN_TINY = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
             "truncate": False, "original_max_position_embeddings": 32}  # its ramp starts at the fastest frequency


@pytest.mark.parametrize("rope, head_dim, note", [
    (YARN_RELEASED, 64, "8.09-17.40, llama.cpp over whole dimensions 8-18 .* 9 of 32 frequencies differ, by up to "
                        r"76.3% \(frequency 17\).* 2.21e-04 rad per position: 0.1 rad by position 453, 1 rad by 4530"),
    (YARN_TINY, 16, r"0.00-1.41, llama.cpp over whole dimensions 0-2 .* 1 of 8 frequencies differ, by up to 47.6% "
                    r"\(frequency 1\).* 5.73e-02 rad per position: 0.1 rad by position 2, 1 rad by 18")])
def test_yarn_truncate_false_is_written_as_llama_cpp_does_and_noted(rope, head_dim, note, tmp_path):
    """YaRN with truncate: false: our float64 per-frequency rates of both rules are transformers' own
    (_compute_yarn_parameters, truncate false and true); the GGUF carries llama.cpp's converter's keys (its rounded
    ramp) and the export says what differs and by how much, for released gpt-oss and for a config whose gap is
    large at the first positions."""
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    from qlora_kit.export.gguf import rope as gguf_rope

    for truncate in (False, True):
        config = GptOssConfig(head_dim=head_dim, rope_parameters={**rope, "truncate": truncate})
        theirs, attention = _compute_yarn_parameters(config)
        ours = gguf_rope.yarn_inv_freq({**rope, "truncate": truncate}, head_dim, truncate)
        np.testing.assert_allclose(ours, theirs.double(), rtol=1e-6)
        assert attention == pytest.approx(0.1 * np.log(rope["factor"]) + 1)  # llama.cpp's own, inside its rope
    base = build("gptoss", tmp_path / "base", config={"head_dim": head_dim, "rope_parameters": rope})
    res = export(adapter("gptoss", tmp_path / "a", base, targets=("o_proj",)), tmp_path / "m.gguf", gguf_type="f32")
    said = [n for n in res.notes if "truncate: false" in n]
    assert len(said) == 1 and re.search(note, said[0]), res.notes
    fields, _, _ = read(tmp_path / "m.gguf")
    assert fields["gpt-oss.rope.scaling.type"] == "yarn" and fields["gpt-oss.rope.freq_base"] == rope["rope_theta"]
    assert fields["gpt-oss.rope.scaling.factor"] == rope["factor"] and "rope_freqs.weight" not in read(
        tmp_path / "m.gguf")[1]
    assert fields["gpt-oss.rope.scaling.original_context_length"] == rope["original_max_position_embeddings"]
