"""Estimated vs measured training-step memory for every architecture's tiny random model, on this machine's CPU.

    python bench/arch_memory.py                       # all, seq 256 batch 4, r 16 (the recipe defaults)
    python bench/arch_memory.py --archs gemma2 gpt_oss --seq 512

Each architecture: a random bf16 model (hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 320; mixtures of experts 4
experts, top 2) built with transformers and saved in the Hub layout, then measured by `python -m
qlora_kit.measure.breakdown` (one process each: the static inventory of the loaded QLoRA model and optimizer + the
allocator's events of one profiled step, the number `qlora-kit bench memory` reports) next to the analytic estimate
of the same recipe (estimate/recipe.py). Mixtures of experts train with LoRA dropout 0 (LoRA on experts has none).
Writes bench/results/arch_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import save_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=4096, pad_token_id=2, bos_token_id=0, eos_token_id=1)
FALCON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=320, pad_token_id=2,
              bos_token_id=0, eos_token_id=1, max_position_embeddings=4096)
GPT2 = dict(n_embd=64, n_inner=192, n_layer=2, n_head=4, vocab_size=320, n_positions=4096, pad_token_id=2,
            bos_token_id=0, eos_token_id=1)  # GPT-2's own names; its dropouts (attn, resid, embd) stay at GPT-2's 0.1
ARCHS = {  # name -> (transformers config class name, its arguments)
    "llama": ("LlamaConfig", {}), "mistral": ("MistralConfig", {}), "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}), "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}), "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}), "phi": ("PhiConfig", {}), "falcon": ("FalconConfig", FALCON),
    "stablelm": ("StableLmConfig", {}), "starcoder2": ("Starcoder2Config", {}), "olmo2": ("Olmo2Config", {}),
    "cohere": ("CohereConfig", {}), "granite": ("GraniteConfig", {}),
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None}), "gpt2": ("GPT2Config", GPT2),
}
# Mixtures of experts: 4 experts, top 2 (tests/moe_models.py's shapes); DeepSeek's layer 0 is dense, layer 1 MoE
_MLA = dict(moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
            kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            num_key_value_heads=4)
MOE_ARCHS = {
    "mixtral": ("MixtralConfig", {"intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {"moe_intermediate_size": 48, "shared_expert_intermediate_size": 96,
                                     "num_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"moe_intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2,
                                     "head_dim": 16}),
    "deepseek_v2": ("DeepseekV2Config", _MLA),
    "deepseek_v3": ("DeepseekV3Config", {**_MLA, "n_group": 1, "topk_group": 1}),
    "gpt_oss": ("GptOssConfig", {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "head_dim": 16}),
}
ARCHS.update(MOE_ARCHS)


def build(name: str, folder: Path) -> Path:
    import torch
    import transformers

    cls, extra = ARCHS[name]
    args = {**(BASE if cls not in ("FalconConfig", "GPT2Config") else {}), **extra}
    config = getattr(transformers, cls)(**{k: v for k, v in args.items() if v is not None})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "arch_memory")
    args = ap.parse_args(argv)
    from qlora_kit.measure.breakdown import machine_info
    from qlora_kit.measure.grid import DEFAULTS, run_one

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            folder = build(name, Path(tmp) / name)
            c = {**DEFAULTS, "seq": args.seq, "batch": args.batch, "rank": args.rank}
            if name in MOE_ARCHS:  # LoRA on experts has no dropout (PEFT's ParamWrapper refuses it): neither here
                c["dropout"] = 0.0
            r = run_one(str(folder), c, steps=3, threads=0, device="cpu", timeout=900)
            row = {"arch": name, "config": c}
            if "failed" in r:
                row["failed"] = r["failed"]
            else:
                row.update(measured=r["peak_bytes"], estimate=r["estimate_total"], error=r["error"],
                           measured_phase=r["peak_phase"], estimate_phase=r["estimate_phase"],
                           at_peak=r["at_peak"], estimate_components=r["estimate"])
            rows.append(row)
            print(name, row.get("failed") or f"measured {row['measured']:,} estimate {row['estimate']:,} "
                  f"({row['error']:+.2%})", file=sys.stderr)
    doc = {"command": "python " + shlex.join(["bench/arch_memory.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": machine_info(), "results": rows}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(doc))
    return 0


def report(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Estimated vs measured memory, every architecture (tiny random models, CPU)", "",
             f"`{doc['command']}` on {m['cpu']} ({m['cores']} cores, shared; load average {m['loadavg'][0]} at the "
             "start). Peak = the static inventory + the largest transient total of one profiled step (the allocator's "
             "events), as `qlora-kit bench memory` measures.",
             "", "| architecture | measured | estimated | error | peak phase (measured / estimated) |",
             "|---|---:|---:|---:|---|"]
    for r in doc["results"]:
        if "failed" in r:
            lines.append(f"| {r['arch']} | failed: {r['failed'][:80]} | | | |")
        else:
            lines.append(f"| {r['arch']} | {r['measured'] / 2**20:.2f} MiB | {r['estimate'] / 2**20:.2f} MiB | "
                         f"{r['error']:+.2%} | {r['measured_phase']} / {r['estimate_phase']} |")
    done = [r for r in doc["results"] if "failed" not in r]
    near = [r["arch"] for r in done if abs(r["error"]) <= 0.03]
    far = [f"{r['arch']} {r['error']:+.2%}" for r in done if abs(r["error"]) > 0.03]
    lines += ["", f"Within 3%: {len(near)} of {len(done)} measured ({', '.join(near)})"
              + (f"; off: {', '.join(far)}." if far else "."),
              "", "Mixtures of experts: the tensors the experts save sum over the top_k x T (token, expert) pairs, "
              "whatever the routing, and so does their backward: model/moe.py runs every routed row at once (one "
              "(N, H) gather, (N, 2I) and (N, H) cats, one routing-weight product), so the estimate's moments are "
              "the routing product's backward (three (N, H) tensors in the routing weights' dtype) and the GLU's "
              "over (N, I), with what is freed by then (estimate/backward.py). The routing decides only the "
              "dequantized weight of one hit expert at a time."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
