"""One mixture-of-experts decoder layer's saved tensors, as qlora-kit trains it (prepare(): quantized experts, one
at a time, LoRA on every expert and on the attention), against layer_activations: saved-tensor hooks count every
storage autograd keeps while the last decoder layer runs (a sparse layer in each builder).

Each case exercises a term of its own: DeepSeek-V3's fp32 latent norms, v as a view of kv_b_proj's output and
o_proj's copied input; gpt-oss's eager attention with sinks and its clamped GLU; Qwen2-MoE's gated shared expert;
Mixtral's plain routed experts. The routing decides how the tokens split over the experts, not what they save in
total (top_k x T token-expert pairs), so the sums are compared; what the estimate leaves out (the router's top-k
values and normaliser, the rotary tables every layer reads) is well under 2% here."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from moe_models import make_moe_model
from qlora_kit.estimate import analytic as me
from qlora_kit.measure.breakdown import MeasureConfig, estimate_config, recipe_for, synthetic_batch


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss", "qwen2_moe", "mixtral"])
def test_moe_layer_saved_tensors_equal_the_estimate(arch, tmp_path):
    import json

    from qlora_kit.train import loop as train

    folder = make_moe_model(tmp_path / "m", arch)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    B, S = 2, 160
    cfg = MeasureConfig(model=str(folder), seq=S, batch=B, rank=8, dropout=0.0, threads=1,
                        overrides="train.gradient_checkpointing=false")
    recipe = recipe_for(cfg, data)
    p = train.prepare(recipe)
    decoder = p.model.get_decoder()
    frozen = {t.untyped_storage().data_ptr() for t in [*p.model.parameters(), *p.model.buffers()]}
    inside, saved = [False], {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in frozen:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    last = decoder.layers[-1]
    last.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    last.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    config = json.loads((folder / "config.json").read_text())
    ids = synthetic_batch(config["vocab_size"], B, S, 0)["input_ids"]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=ids)
    s = me.count_params(config)
    ec = estimate_config(recipe, "cpu")
    terms = me.layer_activations(s, ec, me.resolve_targets(s, ec.targets))
    measured = sum(saved.values())
    assert sum(terms.values()) == pytest.approx(measured, rel=0.02), (measured, terms)
