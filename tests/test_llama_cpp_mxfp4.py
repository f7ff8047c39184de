"""gpt-oss as released (MXFP4 experts, quant/mxfp4.py) through llama.cpp itself (the xllamacpp wheel; skipped
without the `llama-cpp` extra): a QLoRA run on the MXFP4 base, exported as an f32 GGUF, gives in llama.cpp the greedy
tokens and log-probabilities transformers computes with the run's `--format merged` export."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from moe_models import make_mxfp4_gpt_oss
from test_moe_train import RECORDS, _train

xlc = pytest.importorskip("xllamacpp", reason="llama.cpp runtime not installed: pip install 'qlora-kit[llama-cpp]'")
from test_llama_cpp import llama_greedy, server  # noqa: E402  (after the skip: it imports xllamacpp)
from test_llama_cpp_archs import PROMPTS, banned_of  # noqa: E402
from test_llama_cpp_gptoss import run_gguf_vs_merged  # noqa: E402


def test_mxfp4_runs_gguf_is_its_merged_export_in_llama_cpp(tmp_path):
    err = run_gguf_vs_merged(make_mxfp4_gpt_oss(tmp_path / "gpt-oss"), tmp_path)
    print(f"MXFP4 gpt-oss run: llama.cpp f32 GGUF vs transformers on the merged export, max |log p| diff {err:.2e}")


def test_mxfp4_base_gguf_plus_the_runs_adapter_gguf_is_the_merged_gguf(tmp_path):
    """The MXFP4 base itself as an f32 GGUF (the export of a zero adapter, original merge base: the decoded experts)
    + the run's adapter GGUF through llama.cpp's LoRA path give the tokens and log-probabilities of the run merged
    onto that same base (`--merge-base original`), experts included; the adapter moves them."""
    from qlora_kit.adapters import peft_format
    from qlora_kit.export import formats as export

    folder = make_mxfp4_gpt_oss(tmp_path / "gpt-oss")
    run = _train(folder, "gpt_oss", write_jsonl(tmp_path / "d.jsonl", RECORDS), tmp_path / "run")
    a = peft_format.load_adapter(run / "adapter")
    assert any(".experts." in k for k in a.tensors)  # the experts are adapted: their LoRA goes through llama.cpp too
    zero = tmp_path / "zero"
    peft_format.save_adapter(zero, {k: v * 0 if "lora_B" in k else v for k, v in a.tensors.items()}, r=a.r,
                             alpha=a.alpha, dropout=0.0, rslora=a.rslora, base_model=str(folder))

    def gguf(src, out, fmt="gguf"):
        export.export(str(src), export.Options(fmt, tmp_path / out, gguf_type="f32", merge_base="original",
                                               base=str(folder), progress=False))
        return tmp_path / out

    base, merged, lora = gguf(zero, "base.gguf"), gguf(run, "merged.gguf"), gguf(run, "lora.gguf", "gguf-adapter")
    banned, err, moved = banned_of(folder), 0.0, 0.0
    srv_merged, srv_lora, srv_base = server(merged), server(base, lora), server(base)
    for prompt in PROMPTS:
        tokens, lps = llama_greedy(srv_merged, prompt, banned)
        tokens_lora, lps_lora = llama_greedy(srv_lora, prompt, banned)
        assert tokens_lora == tokens, prompt
        err = max(err, *(abs(x[i] - y.get(i, -99.0)) for x, y in zip(lps, lps_lora) for i in x))
        _, lps_base = llama_greedy(srv_base, prompt, banned)
        moved = max(moved, *(abs(v - lps_base[0].get(i, -99.0)) for i, v in lps[0].items()))
    print(f"MXFP4 gpt-oss: base + adapter GGUF vs merged, max |log p| diff {err:.2e}; the adapter moves {moved:.2f}")
    assert err < 2e-3 and moved > 0.05, (err, moved)
