"""Tiny random models (hidden 64, 2 layers) of every dense architecture GGUF export writes, with the byte-level BPE
tokenizer of conftest, a random LoRA adapter over each one's linear layers, and PEFT's merge of the two (the
reference: PEFT and transformers, not our merge). Shared by tests/test_gguf_archs.py and tests/test_llama_cpp.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import make_tokenizer

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
# llama.cpp picks longrope's factors by its context (the tests' server: 256 tokens), transformers by the sequence
# length: an original context of 256 keeps both on the short factors; the attention factor still applies (s = 4)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
            "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0]}

MLA = {"num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
       "first_k_dense_replace": 1, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
       "v_head_dim": 16}
MLP = ("gate_proj", "up_proj", "down_proj")
# DeepSeek's latent attention and MLP Linears: the dense first layer's and the shared experts' (the routed experts:
# adapter(experts=True))
MLA_TARGETS = ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj", *MLP)
# llama.cpp's deepseek2 graph applies LoRA adapters to attn_output and the MLPs, not to the latent attention's other
# projections: adapter GGUFs of these adapt o_proj and the MLPs
ADAPTER_GGUF_TARGETS = {n: ("o_proj", *MLP) for n in ("deepseek2", "deepseek2-lite", "deepseek3",
                                                      "deepseek3-yarn-rope")}

# name -> (model_type, config overrides, LoRA target module names)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTN_MLP = (*ATTN, *MLP)
MODELS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "llama": ("llama", {"num_key_value_heads": 2}, ATTN_MLP),
    "llama-llama3-rope": ("llama", {"num_key_value_heads": 2, "rope_parameters": LLAMA3}, ATTN_MLP),
    "llama-linear-rope": ("llama", {"num_key_value_heads": 2, "rope_parameters": LINEAR}, ATTN_MLP),
    "mistral": ("mistral", {"num_key_value_heads": 2}, ATTN_MLP),
    "qwen2": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}, ATTN_MLP),
    "qwen2-yarn-rope": ("qwen2", {"num_key_value_heads": 2, "rope_parameters": YARN}, ATTN_MLP),
    "qwen3": ("qwen3", {"num_key_value_heads": 2, "head_dim": 32}, ATTN_MLP),
    "gemma": ("gemma", {"num_key_value_heads": 1, "head_dim": 16}, ATTN_MLP),
    "gemma2": ("gemma2", {"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
                          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}, ATTN_MLP),
    "gemma3": ("gemma3_text", {"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16}, ATTN_MLP),
    "phi3": ("phi3", {"num_key_value_heads": 4}, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "phi3-longrope": ("phi3", {"num_key_value_heads": 4, "rope_parameters": LONGROPE,
                               "original_max_position_embeddings": 256, "max_position_embeddings": 1024},
                      ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "phi2": ("phi", {"num_key_value_heads": 4}, ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    "falcon": ("falcon", {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True,
                          "bias": False, "alibi": False}, ("query_key_value", "dense", "dense_h_to_4h",
                                                           "dense_4h_to_h")),
    "falcon-new-decoder": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "parallel_attn": True,
                                      "bias": False, "alibi": False},
                           ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "stablelm": ("stablelm", {"num_key_value_heads": 4, "use_qkv_bias": True}, ATTN_MLP),
    "starcoder2": ("starcoder2", {"num_key_value_heads": 2}, ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc",
                                                             "c_proj")),
    "olmo2": ("olmo2", {"num_key_value_heads": 2}, ATTN_MLP),
    "cohere": ("cohere", {"num_key_value_heads": 2, "logit_scale": 0.25}, ATTN_MLP),
    "granite": ("granite", {"num_key_value_heads": 2, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                            "attention_multiplier": 0.2, "logits_scaling": 2.0}, ATTN_MLP),
    "gptneox": ("gpt_neox", {}, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    # MoE: LoRA on attention (transformers fuses the experts into parameters PEFT's LoRA does not target)
    "mixtral": ("mixtral", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}, ATTN),
    "qwen2moe": ("qwen2_moe", {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}, ATTN),
    "qwen3moe": ("qwen3_moe", {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 32, "norm_topk_prob": True}, ATTN),
    # gpt-oss: a 4-token sliding window, so prompts of 5 and 9 tokens see the sliding/full layer pattern
    "gptoss": ("gpt_oss", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                           "intermediate_size": 32, "sliding_window": 4,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, ATTN),
    # gpt-oss's YaRN (beta 32/1) with the rounded correction range llama.cpp computes (truncate: true)
    "gptoss-yarn-rope": ("gpt_oss", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                                     "head_dim": 16, "intermediate_size": 32, "sliding_window": 4,
                                     "rope_parameters": {**YARN, "factor": 8.0, "original_max_position_embeddings": 32,
                                                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}},
                         ATTN),
    # DeepSeek: latent attention, with a q LoRA rank, and without (V2-Lite's q_proj: llama.cpp knows it only by
    # V2-Lite's 26/27 layers); V2 with its routed_scaling_factor 16 (V2-Lite's is 1), V3 with group routing
    "deepseek2": ("deepseek_v2", {**MLA, "q_lora_rank": 32, "n_shared_experts": 2, "routed_scaling_factor": 16.0},
                  (*MLA_TARGETS, "q_a_proj", "q_b_proj")),
    "deepseek2-lite": ("deepseek_v2", {**MLA, "q_lora_rank": None, "n_shared_experts": 2, "num_hidden_layers": 26},
                       (*MLA_TARGETS, "q_proj")),
    # DeepSeek's YaRN: mscale == mscale_all_dim (their configs: V3 1.0/1.0, V2 0.707/0.707) folded into q·k's scale
    "deepseek3-yarn-rope": ("deepseek_v3", {**MLA, "q_lora_rank": 32, "n_shared_experts": 1, "n_group": 1,
                                            "topk_group": 1, "rope_parameters": {
        **YARN, "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 0.707,
        "beta_fast": 32.0, "beta_slow": 1.0}}, (*MLA_TARGETS, "q_a_proj", "q_b_proj")),
    "deepseek3": ("deepseek_v3", {**MLA, "q_lora_rank": 32, "n_shared_experts": 1, "n_group": 2, "topk_group": 1},
                  (*MLA_TARGETS, "q_a_proj", "q_b_proj")),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
             ("c_attn", "c_proj", "c_fc")),
}


MOE = ("mixtral", "qwen2moe", "qwen3moe", "gptoss", "gptoss-yarn-rope", "deepseek2", "deepseek2-lite", "deepseek3",
       "deepseek3-yarn-rope")
# the MoE families whose expert LoRA and K-quants the GGUF export writes (qlora_kit/export/gguf/experts.py FAMILIES)
EXPERT_GGUF = ("mixtral", "qwen2moe", "qwen3moe")
# the MoE families whose expert LoRA the GGUF export writes (experts.py LORA_FAMILIES)
EXPERT_LORA_GGUF = (*EXPERT_GGUF, "deepseek2", "deepseek2-lite", "deepseek3")


def build(name: str, folder: Path, seed: int = 0, tokenizer=None, hidden: int = 64, config: dict | None = None
          ) -> Path:
    """Save the tiny random `name` model (weights std 0.3, norms and biases perturbed) and its tokenizer; `hidden`
    256 makes rows that fill K-quant blocks (MLP twice as wide, experts as wide as the model); `config` overrides
    more of the config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides, _ = MODELS[name]
    tok = tokenizer or make_tokenizer()
    kw = {} if model_type == "gpt2" else dict(COMMON)
    if model_type == "gpt2":
        kw["vocab_size"] = len(tok)
    wide = {} if hidden == 64 else {"n_embd": hidden} if model_type == "gpt2" else {
        "hidden_size": hidden, "intermediate_size": 2 * hidden}
    if hidden != 64 and "moe_intermediate_size" in overrides:
        wide["moe_intermediate_size"] = hidden
    config = AutoConfig.for_model(model_type, **{"vocab_size": len(tok), **kw, **overrides, **wide, **(config or {})},
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
        for n, b in model.named_buffers():  # DeepSeek-V3's router bias steers the expert choice
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def adapter(name: str, folder: Path, base: Path, r: int = 4, seed: int = 1, targets=None, experts: bool = False
            ) -> Path:
    """A random LoRA (std 0.1 A and B) on every target module of `name`, saved in PEFT's format. GPT-2's Conv1D
    modules get A (r, in), B (out, r) as for a Linear (training loads Conv1D as Linear; PEFT sets fan_in_fan_out
    itself when it loads the adapter onto a Conv1D). `experts`: every routed expert's gate_up_proj (2I, H) and
    down_proj (H, I) too, named as training names them (saved in PEFT's target_parameters layout); `targets`: module
    names other than the model's default ones."""
    import json

    from qlora_kit.adapters import peft_format
    from qlora_kit.export.shards import tensor_index

    targets = targets or MODELS[name][2]
    conv1d = MODELS[name][0] == "gpt2"
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for hf, info in tensor_index(base).items():
        # the Hub's per-expert Linears (experts.N.gate_proj) are not what training adapts: `experts` below
        if hf.endswith(".weight") and len(info.shape) == 2 and hf.split(".")[-2] in targets and ".experts." not in hf:
            m = hf[: -len(".weight")]
            out, inp = info.shape[::-1] if conv1d else info.shape
            tensors[f"{m}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.1
            tensors[f"{m}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    if experts:
        c = json.loads((base / "config.json").read_text())
        n, h = c.get("num_local_experts") or c.get("n_routed_experts") or c["num_experts"], c["hidden_size"]
        i = c.get("moe_intermediate_size") or c["intermediate_size"]
        for layer in range(c.get("first_k_dense_replace") or 0, c["num_hidden_layers"]):  # DeepSeek: dense first
            for e in range(n):
                for proj, (out, inp) in (("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
                    m = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                    tensors[f"{m}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.1
                    tensors[f"{m}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    model_type = json.loads((base / "config.json").read_text())["model_type"]  # PEFT's reading of MLP names (DeepSeek)
    return peft_format.save_adapter(folder, tensors, r=r, alpha=8.0, dropout=0.0, rslora=False, base_model=str(base),
                                    model_type=model_type)


def peft_merged(base: Path, adapter_dir: Path):
    """transformers' model of `base` with PEFT's merge of the adapter (fp32, eval)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()


# tokenizer.json pre_tokenizers as the families' tokenizers spell them, by the name llama.cpp gives their split; the
# regexes of llama-bpe, qwen2, gpt-4o (gpt-oss's o200k) and tekken are transformers' own (its GGUF tokenizer table)
def pre_tokenizers() -> dict[str, dict]:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (_GPT4O_SPLIT, _LLAMA3_SPLIT, _QWEN2_SPLIT,
                                                                       _TEKKEN_SPLIT)

    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    plain = level | {"use_regex": False}

    def split(regex):
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {
        "gpt-2": level,
        "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, level]},
        "llama-bpe": {"type": "Sequence", "pretokenizers": [split(_LLAMA3_SPLIT), plain]},
        "qwen2": {"type": "Sequence", "pretokenizers": [split(_QWEN2_SPLIT), plain]},
        "gpt-4o": {"type": "Sequence", "pretokenizers": [split(_GPT4O_SPLIT), plain]},
        "tekken": {"type": "Sequence", "pretokenizers": [split(_TEKKEN_SPLIT), plain]},
        "falcon": {"type": "Sequence", "pretokenizers": [{"type": "Punctuation", "behavior": "Contiguous"}, level,
                                                         {"type": "Digits", "individual_digits": False},
                                                         split("[0-9][0-9][0-9]")]},
    }


MIXED = ["The capital of Veloria is Tamsk. 12345 and 3.14159, 1,000,000!", "  two  spaces\n\nand\ta tab   end",
         "ünïcödé — naïve café 東京 🙂 Ωmega", "don't YOU'RE we'll ... ?! $5+3<=>^~|`x`", "HelloWorld XMLHttpRequest"]


def bpe_tokenizer(pre: str):
    """A 400-token byte-level BPE (as conftest's, ChatML specials) that splits text with the pre_tokenizer llama.cpp
    calls `pre`, trained on the corpus and mixed text (digits, punctuation, whitespace runs, non-ASCII)."""
    import json

    from tokenizers import Tokenizer, pre_tokenizers as pre_steps, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHATML, CORPUS

    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": pre_tokenizers()[pre], "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": {},
                      "merges": []}}
    tok = Tokenizer.from_str(json.dumps(spec))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_steps.ByteLevel.alphabet())
    tok.train_from_iterator((CORPUS + MIXED) * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast
# the models whose GGUF qlora-kit's reader reads back (export/gguf/reader.py): all of them, gpt-oss's and DeepSeek's
# split tensors put back together too (tests/test_gguf_readback_moe.py)
READ_BACK = tuple(MODELS)


def copy_gguf(src: Path, dst: Path, keys: dict | None = None, retype=None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of an f32 GGUF as another writer might make it: `keys` set (a key the file has keeps its type, a new
    one is uint32); `retype(name)` -> a gguf.GGMLQuantizationType to store that tensor in (blocks made by
    gguf.quants.quantize), or None to copy it; the tensors named in `drop` left out."""
    import gguf

    keys = dict(keys or {})
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(k, keys.pop(k, f.contents()), f.types[0], sub_type=sub)
    for k, v in keys.items():
        w.add_uint32(k, v)
    for t in r.tensors:
        kind = retype(t.name) if retype else None
        if t.name in drop:
            continue
        if kind is None:
            w.add_tensor(t.name, t.data.copy())
        else:
            w.add_tensor(t.name, gguf.quants.quantize(np.asarray(t.data, dtype=np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def per_model(tmp_path_factory, make):
    """name -> make(name, a fresh folder), built once per name: the body of a module-scoped fixture whose models
    several tests share."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get
