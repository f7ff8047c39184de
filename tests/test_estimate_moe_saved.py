"""One mixture-of-experts decoder layer's saved tensors, as qlora-kit trains it (prepare(): quantized experts, one
at a time, LoRA on every expert and on the attention), against layer_activations: saved-tensor hooks count every
storage autograd keeps while the last decoder layer runs (a sparse layer in each builder).

Each case exercises a term of its own: DeepSeek-V3's lean latent norms, v as a view of kv_b_proj's output and
o_proj's copied input; gpt-oss's eager attention with sinks and its clamped GLU; Qwen2-MoE's gated shared expert;
Mixtral's plain routed experts. The routing decides how the tokens split over the experts, not what they save in
total (top_k x T token-expert pairs), so the sums are compared; what the estimate leaves out (the router's top-k
values and normaliser, the rotary tables every layer reads) is well under 2% here."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from moe_models import make_moe_model
from saved_layer import last_layer_saved


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss", "qwen2_moe", "mixtral"])
def test_moe_layer_saved_tensors_equal_the_estimate(arch, tmp_path):
    folder = make_moe_model(tmp_path / "m", arch)
    _, measured, terms = last_layer_saved(folder, 2, 160, dropout=0.0)
    assert sum(terms.values()) == pytest.approx(measured, rel=0.02), (measured, terms)
