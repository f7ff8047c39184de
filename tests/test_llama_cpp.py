"""Our GGUF files run by llama.cpp itself (its C++ code through the prebuilt `xllamacpp` wheel: the same model loader,
tokenizer, LoRA application and sampler as llama-server). Skipped when the optional extra is not installed:
`pip install "qlora-kit[llama-cpp]"`.

References, none of them ours: transformers' Llama on the merged HF export (greedy tokens and log-probabilities);
llama.cpp's own `--lora` application on the base GGUF against our merged GGUF; the gguf package's dequantizer for
the K-quant blocks we have llama.cpp's ggml write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_recipe
from qlora_kit.export import formats as ex
from qlora_kit.adapters import peft_format

xlc = pytest.importorskip("xllamacpp", reason="llama.cpp runtime not installed: pip install 'qlora-kit[llama-cpp]'")
gguf = pytest.importorskip("gguf")
PROMPTS = ((1, 5, 17, 42), (1, 99, 7, 250, 3), (2, 8, 120, 64, 33, 201))
STEPS = 8  # greedy tokens per prompt
TOP = 5  # log-probabilities compared per step


def export(src, out, **kw) -> ex.Result:
    return ex.export(src, ex.Options(out=Path(out), progress=False, **{"format": "gguf", **kw}))


def server(path: Path, lora: Path | None = None, n_ctx: int = 64):
    """llama.cpp's server engine in-process (one slot, no HTTP traffic), like `llama-server -m PATH --lora LORA`."""
    p = xlc.CommonParams()
    p.model.path = str(path)
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_parallel = n_ctx, n_ctx, n_ctx, 1
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 1
    p.warmup = False
    # f32 KV cache and no flash attention: llama.cpp's defaults (f16 K/V) would add ~1e-2 to every log-probability
    p.cache_type_k = p.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
    p.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if lora is not None:
        info = xlc.CommonAdapterLoraInfo()
        info.path, info.scale = str(lora), 1.0
        p.lora_adapters = [info]
    return xlc.Server(p)


@pytest.fixture(scope="module")
def banned(tiny_model) -> list[int]:
    """Tokens greedy decoding may not pick, in both engines: special tokens, and byte tokens that are not complete
    UTF-8 on their own (the random model emits them, and llama-server holds back an incomplete UTF-8 piece and
    drops its log-probabilities, so steps could no longer be matched one to one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [i for i in range(len(tok)) if i in tok.all_special_ids or "\ufffd" in tok.decode([i])]


def llama_greedy(srv, prompt: list[int], banned: list[int]) -> tuple[list[int], list[dict[int, float]]]:
    """Greedy continuation of token ids (no BOS added) and, per step, the top log-probabilities llama.cpp computes
    from its logits (softmax of the raw logits, before the ban)."""
    r = srv.handle_completions({"prompt": list(prompt), "max_tokens": STEPS, "temperature": 0.0, "n_probs": TOP,
                                "ignore_eos": True, "cache_prompt": False, "logit_bias": [[i, False] for i in banned]})
    steps = r["choices"][0]["logprobs"]["content"]
    assert len(steps) == STEPS, r["choices"][0]
    return [s["id"] for s in steps], [{t["id"]: t["logprob"] for t in s["top_logprobs"]} for s in steps]


def hf_greedy(model, prompt: list[int], banned: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """The same with transformers: argmax of each step's logits over the allowed tokens, and each step's full
    log-softmax (float64)."""
    ids, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(STEPS):
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
            logps.append(lp)
            ids.append(int(lp.index_fill(0, torch.tensor(banned), -torch.inf).argmax()))
    return ids[len(prompt):], logps


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tiny_data, tmp_path_factory) -> Path:
    from qlora_kit.train import loop as train

    run = tmp_path_factory.mktemp("qlora") / "run"
    train.run(tiny_recipe(tiny_model, tiny_data, quant={"compute_dtype": "fp32"}), run, progress=False)
    return run


def test_greedy_tokens_and_logprobs_of_our_gguf_equal_the_merged_hf_model(qlora_run, banned, tmp_path):
    """The QLoRA run merged (dequantized base, as trained) -> HF fp32 folder and our f32 / f16 GGUFs: llama.cpp's
    greedy tokens equal transformers' on every prompt, and its top log-probabilities agree: f32 to float rounding,
    f16 within the rounding of f16 weights (and of the f16 activations ggml's CPU matmul uses for f16 weights)."""
    from transformers import AutoModelForCausalLM

    ex.export(qlora_run, ex.Options("merged", tmp_path / "merged", dtype="fp32", progress=False))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    for kind, bound in (("f32", 1e-4), ("f16", 5e-2)):
        export(qlora_run, tmp_path / f"m-{kind}.gguf", gguf_type=kind)
        srv = server(tmp_path / f"m-{kind}.gguf")
        err = 0.0
        for prompt in PROMPTS:
            ours, ref = llama_greedy(srv, prompt, banned)
            theirs, logps = hf_greedy(model, prompt, banned)
            assert ours == theirs, (kind, prompt)
            err = max(err, *(abs(v - float(lp_hf[i])) for lp_hf, lp_cpp in zip(logps, ref) for i, v in lp_cpp.items()))
        print(f"{kind}: max |log p| difference {err:.2e}")
        assert err < bound, kind


def test_base_gguf_plus_adapter_gguf_equals_our_merged_gguf(qlora_run, banned, tmp_path):
    """`--format gguf-adapter` on llama.cpp's `--lora`: the ORIGINAL base (merge_base original: unquantized) as an f32
    GGUF plus our adapter GGUF give the tokens and log-probabilities of our merged f32 GGUF of the same merge. The
    base GGUF is the export of a zero adapter (B = 0: the base's own weights, same names and metadata)."""
    adapter = peft_format.load_adapter(qlora_run / "adapter")
    zero = tmp_path / "zero"
    peft_format.save_adapter(zero, {k: v * 0 if "lora_B" in k else v for k, v in adapter.tensors.items()}, r=4,
                             alpha=8, dropout=0.0, rslora=False, base_model=adapter.base_model)
    export(zero, tmp_path / "base.gguf", gguf_type="f32", merge_base="original")
    export(qlora_run, tmp_path / "merged.gguf", gguf_type="f32", merge_base="original")
    export(qlora_run, tmp_path / "lora.gguf", format="gguf-adapter", gguf_type="f32")
    merged, with_lora, base = (server(tmp_path / "merged.gguf"), server(tmp_path / "base.gguf", tmp_path / "lora.gguf"),
                               server(tmp_path / "base.gguf"))
    err = moved = 0.0
    for prompt in PROMPTS:
        tokens, lps = llama_greedy(merged, prompt, banned)
        tokens_lora, lps_lora = llama_greedy(with_lora, prompt, banned)
        assert tokens_lora == tokens, prompt
        for a, b in zip(lps, lps_lora):
            assert a.keys() == b.keys(), prompt
            err = max(err, *(abs(a[i] - b[i]) for i in a))
        _, lps_base = llama_greedy(base, prompt, banned)  # the adapter must matter, or the check above proves nothing
        moved = max(moved, *(abs(v - lps_base[0].get(i, -99.0)) for i, v in lps[0].items()))
    print(f"base+lora vs merged: max |log p| difference {err:.2e}; the adapter moves log p by up to {moved:.2f}")
    assert err < 1e-4 and moved > 0.05


# llama.cpp's Q4_K_M / Q5_K_M type mix for a 2-layer model (use_more_bits picks layer 1), stated independently of
# gguf_kquant: hidden 256 fills K blocks; the MLP's 352 does not, so ffn_down takes llama.cpp's fallback types.
K_MIX = {
    "q4_k_m": {"blk.0.attn_v": "Q4_K", "blk.1.attn_v": "Q6_K", "blk.0.ffn_down": "Q5_0", "blk.1.ffn_down": "Q8_0",
               "output": "Q6_K", "other": "Q4_K"},
    "q5_k_m": {"blk.0.attn_v": "Q5_K", "blk.1.attn_v": "Q6_K", "blk.0.ffn_down": "Q5_1", "blk.1.ffn_down": "Q8_0",
               "output": "Q6_K", "other": "Q5_K"},
    "q6_k": {"blk.0.ffn_down": "Q8_0", "blk.1.ffn_down": "Q8_0", "other": "Q6_K"},
}


def test_k_quants_made_by_llama_cpps_ggml_load_and_run(tiny_data, banned, tmp_path):
    """--gguf-type q4_k_m / q5_k_m / q6_k through llama.cpp's ggml quantizer (the xllamacpp wheel's library): the
    file has llama.cpp's per-tensor type mix and file type; the gguf package's dequantizer reads every tensor within
    the type's error of the f16 GGUF; llama.cpp runs the file with the log-probabilities transformers computes from
    the same file (its GGUF loader dequantizes the K blocks in Python) much more closely than the f16 file's."""
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model
    from qlora_kit.train import loop as train

    model = make_tiny_model(tmp_path / "model", hidden=256, intermediate=352)
    run = tmp_path / "run"
    train.run(tiny_recipe(model, tiny_data, quant={"compute_dtype": "fp32"}, train={"steps": 1}), run, progress=False)
    export(run, tmp_path / "m-f16.gguf", gguf_type="f16")
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type)
           for t in gguf.GGUFReader(tmp_path / "m-f16.gguf").tensors}
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m-f16.gguf", dtype=torch.float32).eval()
    first = {prompt: hf_greedy(hf16, prompt, banned)[1][0] for prompt in PROMPTS}
    for kind, bound in (("q4_k_m", 0.1), ("q5_k_m", 0.05), ("q6_k", 0.025)):
        out = tmp_path / f"m-{kind}.gguf"
        export(run, out, gguf_type=kind)
        r = gguf.GGUFReader(out)
        assert r.fields["general.file_type"].contents() == {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[kind]
        for t in r.tensors:
            key = t.name.rsplit(".", 1)[0]
            want = "F32" if len(t.shape) == 1 else K_MIX[kind].get(key, K_MIX[kind]["other"])
            assert t.tensor_type.name == want, (kind, t.name)
            W, R = gguf.quants.dequantize(t.data, t.tensor_type), ref[t.name]
            assert np.linalg.norm(W - R) <= bound * np.linalg.norm(R), (kind, t.name)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        srv, err, err16 = server(out), 0.0, 0.0
        for prompt in PROMPTS:
            _, lps = llama_greedy(srv, prompt, banned)
            _, logps = hf_greedy(hf, prompt, banned)
            err = max(err, *(abs(v - float(logps[0][i])) for i, v in lps[0].items()))
            err16 = max(err16, *(abs(v - float(first[prompt][i])) for i, v in lps[0].items()))
        print(f"{kind}: first-step max |log p| difference, llama.cpp vs transformers on the same file {err:.2e}, "
              f"vs the f16 file {err16:.2e}")
        # llama.cpp reads our blocks as the gguf package does: its error against the same file (ggml's 8-bit
        # activations, ~0.4-0.7 on this model's large logits) is well below the quantization's own error
        assert err < 0.6 * err16, kind
