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

from .activations import inputs_saved, layer_activations, layer_linears, math_attention, tiled

if TYPE_CHECKING:
    from .settings import EstimateConfig
    from .shapes import ModelShapes

# fp32 (T, H) tensors live together in the backward of transformers' fp32 RMSNorm (x.float(), x * rsqrt(mean(x^2)
# + eps), times its weight, cast back), at its worst point: the gradient through the weight product, its product
# with rsqrt, the product with x for rsqrt's gradient, mean's expanded gradient (div) and pow's gradient
RMS32_BACKWARD_TEMPS = 5
# what the MLP's backward no longer needs once attention's backward runs: it freed them on its way down
_MLP_SAVED = ("o_input", "mlp_norm", "gate_up_inputs", "mlp_hidden", "down_input", "mlp_lora_hidden", "mlp_methods",
              "expert_routing", "shared_gate")


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


def _dropout_attention_backward(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...], T: int) -> int:
    """SDPA's CPU math path under the model's attention dropout (layer_activations' attn_weights), at the
    dropout's backward, its worst point (the profiled step's live tensors): beyond the saved set, the gradients of
    the dropped and of the kept probabilities, (B, nh, S, S) fp32 each, next to the fp32 gradients of the output
    and of v, (B, nh, S, hd) each, and the residual gradient (B, S, H) c. Freed by then: what the MLP, the norm
    after attention and the output projection saved (its adapter's (T, r) A output too), the MLP branch's dropout
    mask, and what the product with v saved: the dropped probabilities and v (fp32)."""
    c = cfg.compute_bytes
    scores, qw = 4 * cfg.batch * s.heads * cfg.seq * cfg.seq, 4 * T * s.heads * s.head_dim
    layer = layer_activations(s, cfg, adapted)
    o_name = layer_linears(s)[0][-1].name
    freed = (sum(layer.get(k, 0) for k in _MLP_SAVED) + c * T * cfg.rank * (o_name in adapted) + scores + qw
             + layer.get("resid_dropout", 0) // 2)
    return 2 * scores + 2 * qw + c * T * s.hidden - freed


def _shared_expert_saved(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...], T: int) -> int:
    """What a MoE layer's shared expert saves: its (T, H) input for its adapters, gate, up, act (T, I_s) c and the
    product (T, I_s) c that down_proj's adapter reads, the adapters' (T, r) A outputs, Qwen2-MoE's gate product."""
    if not s.moe.shared:
        return 0
    c, H, I = cfg.compute_bytes, s.hidden, s.moe.shared
    lins = [lin for lin in layer_linears(s)[1] if lin.experts == 1]
    ins = tuple(lin.name for lin in lins if lin.in_features == H)
    return (inputs_saved(cfg, adapted, ins, T, H) + inputs_saved(cfg, adapted, ("down_proj",), T, I)
            + 3 * c * T * I + c * T * cfg.rank * sum(lin.name in adapted for lin in lins)
            + (c * T * (H + 1) if s.moe.shared_gate else 0))


def _experts_backward(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...], T: int,
                      layer: dict[str, int]) -> dict[str, int]:
    """A MoE layer's backward beyond its saved set (layer: layer_activations'), next to the layer output's
    gradient (T, H) c, at the routed experts' two worst points (model/moe.py's Experts, N = top_k x T rows):
      routing_backward: index_add_'s (N, H) c source is freed; out * w's backward holds three (N, H) tensors in
        the weights' dtype: the incoming gradient (cast up to fp32 by .to's backward when w is fp32), grad * w
        (before its cast to c) and grad * out (before its sum to (N, 1))
      experts_glu_backward: act(gate) * up over (N, I): the gradients of h (the split views' gradients cat by
        their backward), of act and of up, (N, I) c each; freed by then: the (N, H) c cat, index_add_'s source and
        h itself (its only saver, down_proj's adapters, ran their backward)
    and the shared expert's product backward (gradients of act and up, (T, I_s) c each; its product freed):
      shared_glu_backward. DeepSeek's shared expert (built after the routed experts) runs its backward first, with
    the layer's whole saved set live, the routed experts' then without its saved set; Qwen2-MoE's (built first)
    runs after the routed experts freed theirs, and its gate product's saved (T, H) output and (T, 1) sigmoid are
    still live at the routed experts' backward (seen on the profiled step's live tensors)."""
    c, H, N, I = cfg.compute_bytes, s.hidden, s.moe.top_k * T, s.moe.intermediate
    shared = _shared_expert_saved(s, cfg, adapted, T)
    routed = sum(layer.get(k, 0) for k in ("gate_up_inputs", "mlp_hidden", "down_input", "mlp_lora_hidden",
                                           "expert_routing")) - shared
    first = shared if s.moe.shared_last else 0  # freed before the routed experts' backward
    weight = 4 if s.moe.weights_fp32 else c
    out = {"routing_backward": 3 * weight * N * H + c * T * H - c * N * H - first,
           "experts_glu_backward": 3 * c * N * I + c * T * H - 2 * c * N * H - c * N * I - first}
    if s.moe.shared:
        out["shared_glu_backward"] = 2 * c * T * s.moe.shared + c * T * H - (0 if s.moe.shared_last else routed)
    return out


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
    elif math_attention(s, cfg):  # SDPA's math path (the model's attention dropout)
        moments["dropout_attention_backward"] = _dropout_attention_backward(s, cfg, adapted, T)
    if s.moe and not tiled(cfg):  # a tiled MLP recomputes the experts per tile (mlp_tile)
        moments.update(_experts_backward(s, cfg, adapted, T, layer_activations(s, cfg, adapted)))
    if moments:
        worst = max(moments, key=moments.get)
        if moments[worst] > working:  # the layer's backward peaks there, not in the MLP: by this much more
            out[worst] = moments[worst] - working
    return out
