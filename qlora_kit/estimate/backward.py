"""The decoder backward's working set where a layout departs from the Llama one.

activation_terms (activations.py) sizes one moment of a layer's backward: the MLP's, with the layer's whole saved
set live (recomputed under checkpointing), one dequantized weight and the in-flight gradients. Some layouts hold
more elsewhere in the layer's backward, or more at that moment; `backward_terms` adds what they hold beyond it,
tensor by tensor, so that the activations stay the peak of the layer's backward. Found on the allocator's events
of a profiled step (measure/timeline.py: the live tensors at the peak, by op), for each tiny model of
bench/arch_memory.py. Pure Python; sizes in bytes, T = batch * seq tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .activations import layer_activations, layer_linears

if TYPE_CHECKING:
    from .settings import EstimateConfig
    from .shapes import ModelShapes

# fp32 (T, H) tensors live together in the backward of transformers' fp32 RMSNorm (x.float(), x * rsqrt(mean(x^2)
# + eps), times its weight, cast back), at its worst point: the gradient through the weight product, its product
# with rsqrt, the product with x for rsqrt's gradient, mean's expanded gradient (div) and pow's gradient
RMS32_BACKWARD_TEMPS = 5
# what the MLP's backward no longer needs once attention's backward runs: it freed them on its way down
_MLP_SAVED = ("o_input", "mlp_norm", "gate_up_inputs", "mlp_hidden", "down_input", "mlp_lora_hidden", "mlp_methods",
              "expert_routing")


def _softmax_backward(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...], T: int) -> int:
    """Eager attention at softmax's backward (its worst point): beyond the saved set, per score
      Gemma 2 (B, nh, S, S): the fp32 gradient of the probabilities (the backward of their cast to c) and softmax's
        fp32 input gradient, 8 bytes; freed: the probabilities' c copy, read by the product with v
      gpt-oss (B, nh, S, S + 1), all in c: softmax's input gradient, the row max's gradient scattered back (c) and
        an fp32 buffer of the max's backward (measured: aten::empty), 2c + 4 bytes; freed: the c probabilities
    and the repeated values' gradient (B, nh, S, hd) c from the product with v, waiting for its branch; the residual
    gradient (B, S, H) c. Freed by then too: everything the MLP, the norms after attention and the output
    projection saved (its adapter's (T, r) A output too), and the repeated values (B, nh, S, hd) c."""
    c, lay = cfg.compute_bytes, s.layout
    if lay.sinks:
        scores = cfg.batch * s.heads * cfg.seq * (cfg.seq + 1)
        grads, probs = (2 * c + 4) * scores, c * scores
    else:
        scores = cfg.batch * s.heads * cfg.seq * cfg.seq
        grads, probs = 8 * scores, c * scores
    layer = layer_activations(s, cfg, adapted)
    o_name = layer_linears(s)[0][-1].name  # the output projection
    freed = sum(layer.get(k, 0) for k in _MLP_SAVED) + c * T * cfg.rank * (o_name in adapted) + probs + c * T * lay.q
    return grads + c * T * lay.q + c * T * s.hidden - freed


def backward_terms(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...],
                   acts: dict[str, int]) -> dict[str, int]:
    """Terms to add to activation_terms' for this layout (empty for the Llama layout). `acts`: activation_terms'."""
    T, c, H, lay = cfg.batch * cfg.seq, cfg.compute_bytes, s.hidden, s.layout
    out = {}
    if lay.residual_scale:
        # branch * m before the residual add: its backward makes g * m, (B, S, H) c, which lives through the
        # branch's backward next to the residual gradient g itself
        out["scaled_branch_grad"] = c * T * H
    # the MLP moment's working set: what activation_terms counts beyond the kept inputs and the saved tensors
    fixed = ("layer_inputs", "all_layers", "recomputed_layer", "attention_masks", "rng_states")
    working = sum(v for k, v in acts.items() if k not in fixed) + sum(out.values())
    moments = {}
    if lay.post_norm and lay.norm == "rms32":
        # the norm after the MLP, the first op of the layer's backward, with every saved tensor of the layer live:
        # its fp32 backward's temporaries next to the residual gradient (B, S, H) c
        moments["post_norm_backward"] = RMS32_BACKWARD_TEMPS * 4 * T * H + c * T * H
    if lay.eager:
        moments["softmax_backward"] = _softmax_backward(s, cfg, adapted, T)
    if moments:
        worst = max(moments, key=moments.get)
        if moments[worst] > working:  # the layer's backward peaks there, not in the MLP: by this much more
            out[worst] = moments[worst] - working
    return out
