"""Activation bytes of one QLoRA training step, term by term: what autograd saves in a decoder layer, what the
checkpoints keep (on the device or, offloaded, on the host), the tiled MLP's working set, and the loss head.

Pure Python (part of the estimate: analytic.py re-exports these); sizes in bytes, T = batch * seq tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_kit.terms import FOUR_BIT

if TYPE_CHECKING:
    from qlora_kit.estimate.settings import EstimateConfig
    from qlora_kit.estimate.shapes import LinearShape, ModelShapes

ATTENTION_PREFIXES = ("self_attn.", "self_attention.", "attention.", "attn.")
RNG_STATE_BYTES = 5056  # torch.get_rng_state(): the CPU generator's Mersenne-Twister state, uint8


def layer_linears(s: ModelShapes) -> tuple[list[LinearShape], list[LinearShape]]:
    """(attention, MLP) Linears of ONE representative decoder layer: in a mixture of experts a sparse layer (its
    routed experts, its shared expert), else any layer (they are alike)."""
    attn = [lin for lin in s.linears if lin.path.startswith(ATTENTION_PREFIXES)]
    mlp = [lin for lin in s.linears if lin not in attn and (s.moe is None or "expert" in lin.path)]
    return attn, mlp


def _groups(lins: list[LinearShape]) -> dict[str, list[LinearShape]]:
    out: dict[str, list[LinearShape]] = {}
    for lin in lins:
        out.setdefault(lin.input_group, []).append(lin)
    return out


def norm_bytes(s: ModelShapes, cfg: EstimateConfig, T: int) -> int:
    """What one full-width norm saves for T tokens (Layout.norm): lean RMSNorm its (T, H) input in c + rsqrt (T, 1)
    fp32; transformers' RMSNorm an fp32 copy + rsqrt; torch's LayerNorm its input + mean and rstd (T, 1) (fp32 on
    CUDA, the input's dtype on the CPU); CohereLayerNorm two fp32 copies + rstd. Gemma's and Cohere's forwards also
    save an fp32 (H,) copy of their weight."""
    c, H, kind = cfg.compute_bytes, s.hidden, s.layout.norm
    stats = 2 * T * (4 if cfg.device == "cuda" else c)
    own = {"lean": c * T * H + 4 * T, "rms32": 4 * T * H + 4 * T, "layer": c * T * H + stats,
           "cohere": 8 * T * H + 4 * T}[kind]
    return own + (4 * H if s.layout.weight_copy else 0)


def input_kept_as_is(s: ModelShapes) -> bool:
    """Whether the layer saves its own input tensor (a lean or Layer norm saves x itself; without an input norm
    the q/k/v adapters do): under checkpointing that tensor is the kept input, not a second copy."""
    return s.layout.norm in ("lean", "layer") or not s.layout.input_norm


def layer_activations(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...]) -> dict[str, int]:
    """Bytes autograd saves inside ONE decoder layer for the whole batch (SDPA flash/efficient kernel with GQA
    inside the kernel, no padding mask; its output is laid out (B, S, nh, hd), so the output projection's input is
    a view of it). Exact against saved-tensor hooks on the CPU, for every dense layout (tests/test_estimate.py,
    tests/test_estimate_families.py)."""
    T, c, r = cfg.batch * cfg.seq, cfg.compute_bytes, cfg.rank
    lay = s.layout
    attn, _ = layer_linears(s)
    out_proj = attn[-1]  # o_proj / dense / c_proj: reads the attention's output
    norm = norm_bytes(s, cfg, T)
    # the input norm's input is the layer input: under checkpointing the kept one (activation_terms)
    terms = {"attn_norm": norm if lay.input_norm else 0}
    for group, lins in _groups(attn).items():
        if lins[0] is out_proj:
            continue
        key = "qkv_inputs" if lins[0].in_features == s.hidden else f"{group}_inputs"
        terms[key] = terms.get(key, 0) + inputs_saved(cfg, adapted, tuple(lin.name for lin in lins), T,
                                                      lins[0].in_features)
    lse = 4 * cfg.batch * s.heads * cfg.seq  # SDPA's logsumexp (B, nh, S) fp32
    terms.update({
        "q_k_v": c * T * (lay.q + lay.k + lay.v),  # (B, nh, S, hd) q, k, v after RoPE, saved by SDPA
        "attn_output": c * T * lay.q + (0 if lay.eager else lse),  # (B, S, nh*hd) c
        "o_input": inputs_saved(cfg, adapted, (out_proj.name,), T, out_proj.in_features, shared=lay.o_view),
    })
    mask = 1 if cfg.device == "cuda" else c  # a dropout mask: CUDA's fused dropout a bool, the CPU's in x's dtype
    if lay.resid_dropout > 0:  # attention's and the MLP's (T, H) outputs, dropped before the residual add: the
        # product saves only the mask
        terms["resid_dropout"] = 2 * mask * T * s.hidden
    if math_attention(s, cfg):
        # SDPA with dropout_p > 0 in training has no fused CPU kernel: its math path upcasts q, k, v to fp32 and
        # materialises the (B, nh, S, S) scores. Saved: q and k^T scaled (bmm), v, each (B, nh, S, hd) fp32 (k, v
        # as many heads as q: GPT-2's nh = kv); the softmax output, the dropout's fp32 mask and the dropped
        # probabilities (bmm with v), (B, nh, S, S) fp32 each; no logsumexp. Its output comes back cast to c in
        # (B, nh, S, hd), so the output projection reads a (B, S, nh*hd) copy. (On CUDA the flash/efficient kernels
        # draw the mask inside from a seed: nothing more is saved.)
        qw = s.heads * s.head_dim
        terms.update(q_k_v=4 * T * 3 * qw, attn_output=0,
                     attn_weights=3 * 4 * cfg.batch * s.heads * cfg.seq * cfg.seq,
                     o_input=inputs_saved(cfg, adapted, (out_proj.name,), T, out_proj.in_features))
    if lay.sinks:  # (B, nh, S, S + 1) probabilities in c (softmax saves them, the product with v a view of them)
        # and the row max's (B, nh, S, 1) int64 indices (the logits are shifted by it)
        terms["attn_weights"] = c * cfg.batch * s.heads * cfg.seq * (cfg.seq + 1) + 8 * cfg.batch * s.heads * cfg.seq
    elif lay.eager:  # (B, nh, S, S) scores: the fp32 softmax output and its c copy (saved by the product with v),
        # and with logit softcapping tanh's c output
        per = 4 + c + (c if s.model_type == "gemma2" else 0)
        terms["attn_weights"] = per * cfg.batch * s.heads * cfg.seq * cfg.seq
    if lay.dense_mask:
        terms["attn_mask"] = c * cfg.batch * cfg.seq * cfg.seq
    full_width = lay.norms_per_layer - (1 if lay.input_norm else 0)
    if full_width:  # the norm before the MLP (and Gemma's, OLMo 2's post norms): c or fp32 + rsqrt each
        terms["mlp_norm"] = full_width * norm - (c * T * s.hidden if lay.norms_share_input else 0)
    terms.update(mlp_saved(s, cfg, adapted, T))
    terms["lora_hidden"] = c * T * r * sum(lin.name in adapted for lin in attn)  # (B, S, r) per adapter: A's output
    terms["attn_methods"] = methods_saved(s, cfg, adapted, tuple(lin.name for lin in attn), T)
    if tiled(cfg):  # the tiled MLP saves only its input x (B, S, H), the normed hidden the adapters read
        terms.update(gate_up_inputs=c * T * s.hidden, mlp_hidden=0, down_input=0, mlp_lora_hidden=0, mlp_methods=0)
    if lay.qk_norm:  # q_norm, k_norm: lean (c per value) or transformers' (an fp32 copy), + rsqrt per vector
        terms["qk_norms"] = (4 if lay.qk_norm_fp32 else c) * T * lay.qk_norm + \
            4 * T * (lay.qk_norm_vectors or s.heads + s.kv_heads)
        if lay.weight_copy:  # Gemma 3's q_norm, k_norm keep fp32 (hd,) copies of (1 + weight) too
            terms["qk_norms"] += 4 * 2 * s.head_dim
    if lay.latent_norms:  # DeepSeek's norms on the q and kv latents, (T, rank) each: lean (c per value) or
        # transformers' (an fp32 copy), + rsqrt (T, 1)
        terms["latent_norms"] = sum((c if lay.norm == "lean" else 4) * T * w + 4 * T for w in lay.latent_norms)
        if lay.norm == "lean":  # the lean norm saves its input, a split view: the whole (T, latent + beside) storage
            terms["latent_norms"] += c * T * lay.latent_beside
    return terms


def math_attention(s: ModelShapes, cfg: EstimateConfig) -> bool:
    """SDPA under the model's own attention dropout on the CPU: no fused kernel takes dropout_p > 0 in training
    there, so it runs its math path (eager and sink layouts build their scores themselves)."""
    return s.layout.attn_dropout > 0 and cfg.device == "cpu" and not (s.layout.eager or s.layout.sinks)


def tiled(cfg: EstimateConfig) -> bool:
    return 0 < cfg.mlp_chunk < cfg.seq  # tiled_mlp.py runs the plain MLP when the sequence fits in one chunk


def mlp_saved(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...], T: int) -> dict[str, int]:
    """What autograd saves in one MLP for T tokens (the whole batch, or one tile of a tiled MLP). Gated: the gate
    output (saved by the activation), its output and the up output (by the product), (T, I) c each; plain
    (fc1 -> act -> fc2): fc1's output, saved by the activation. A mixture of experts runs each token through
    top_k experts, all N = top_k x T rows at once (model/moe.py): the gathered (N, H) input, the (N, 2I_e) gate_up
    cat, the activation's and the product's (N, I_e), and what routing_saved names."""
    c, H = cfg.compute_bytes, s.hidden
    _, mlp = layer_linears(s)
    I = s.active_intermediate
    groups = _groups(mlp)
    ins = [lins for lins in groups.values() if lins[0].in_features == H]
    outs = [lins for lins in groups.values() if lins[0].in_features != H]
    k = s.moe.top_k if s.moe else 1
    terms = {
        # parallel attention and MLP: the MLP's input is the tensor the q/k/v adapters already saved
        "gate_up_inputs": sum(inputs_saved(cfg, adapted, tuple(lin.name for lin in lins), T * (
            k if lins[0].experts > 1 else 1), H, shared=s.layout.parallel) for lins in ins),
        "mlp_hidden": (s.layout.glu_saved if s.layout.gated else s.layout.act_saved) * c * T * I,
        "down_input": sum(inputs_saved(cfg, adapted, tuple(lin.name for lin in lins), T * (
            k if lins[0].experts > 1 else 1), lins[0].in_features) for lins in outs),
        # (B, S, r) A's outputs; a routed expert's per token it got: top_k x T over the experts
        "mlp_lora_hidden": c * cfg.rank * sum(T * (k if lin.experts > 1 else 1) for lin in mlp if lin.name in adapted),
        "mlp_methods": methods_saved(s, cfg, adapted, tuple(lin.name for lin in mlp), T),
    }
    if s.moe:  # model/moe.py's Experts over the N = top_k x T routed rows (gate_up_inputs counts their gathered
        # (N, H) c copy, kept whole by the per-expert split views the adapters save; mlp_hidden the (N, 2I) cat of
        # the gate_up outputs, split by the activation and the product, and the product's (N, I) output)
        terms["expert_routing"] = routing_saved(s, cfg, T)
        if s.moe.shared_gate:  # sigmoid(gate(x)) * shared output: the product saves both, (T, 1) and (T, H) c
            terms["shared_gate"] = c * T * (H + 1)
    return terms


def routing_saved(s: ModelShapes, cfg: EstimateConfig, T: int) -> int:
    """What the routing of one MoE layer saves for T tokens (N = top_k x T routed rows; model/moe.py's Experts):
    the (N, H) c cat of the experts' down_proj outputs and the routing weights gathered per row (N, 1), both saved
    by their product; the (N, H) c source of index_add_ (fp32 weights promote the product to fp32: index_add_
    keeps its cast back to c; c weights: the product itself); the row's token and top-k slot (N,) int64 each
    (saved by the gather and index_add_, and by the weights' index); top-k's (T, k) int64 indices and the
    router's (T, E) fp32 probabilities."""
    c, H, N = cfg.compute_bytes, s.hidden, s.moe.top_k * T
    weight = 4 if s.moe.weights_fp32 else c
    return 2 * c * N * H + weight * N + 2 * 8 * N + 8 * N + 4 * T * s.moe.experts


def inputs_saved(cfg: EstimateConfig, adapted: tuple[str, ...], modules: tuple[str, ...], T: int, width: int,
                 shared: bool = False) -> int:
    """The (T, width) input of `modules` (one shared input: q/k/v, gate/up, or down, o) as LoRA and IA3 save it.
    The frozen quantized base saves nothing (it re-dequantizes W in backward); lora_A saves its input; IA3's input
    scaling x * l saves x (for l's gradient), and a LoRA under it then reads (and saves) its own x * l.
    shared: x is already saved by another op (o_proj's input is a view of the SDPA output)."""
    c = cfg.compute_bytes
    mask = 1 if cfg.device == "cuda" else c
    lora = [m for m in modules if m in adapted]
    scaled = [m for m in modules if m in cfg.ia3_inputs]
    if cfg.lora_dropout > 0 and not cfg.replay_dropout:  # nn.Dropout: per adapter a dropped copy (T, width) c
        own = len(lora) * (c + mask) * T * width  # + its mask: bool from CUDA's fused dropout, c on the CPU
        common = bool(scaled)
    else:  # dropout_replay.py saves x too, not a dropped copy
        own = c * T * width * sum(m in scaled for m in lora)  # each LoRA-under-IA3 saves its x * l
        if cfg.lora_dropout > 0 and cfg.device == "cpu":  # and on the CPU a bool mask per adapter, 1 byte
            own += len(lora) * T * width
        common = bool(scaled) or any(m not in scaled for m in lora)
    return own + (c * T * width if common and not shared else 0)


def methods_saved(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...], modules: tuple[str, ...],
                  T: int) -> int:
    """What DoRA and IA3 save beyond LoRA's inputs, for `modules` of one layer (dora.py, ia3.py forwards).
    DoRA, y + (g-1)*Wx + g*h: the detached norm (out,) fp32 (by g = m / norm), (g-1) and g cast to c (out,) each,
    and Wx, h (T, out) c (each product saves its other factor). IA3 output scaling y * l: y (T, out) c and l cast
    to c (out,); input scaling: l cast (in,) (its x is in `inputs_saved`). In fp32 (c = 4) IA3's cast is a view
    of the parameter itself: nothing."""
    c, total = cfg.compute_bytes, 0
    cast = c if c != 4 else 0
    attn, mlp = layer_linears(s)
    for lin in attn + mlp:
        if lin.name not in modules:
            continue
        if cfg.dora and lin.name in adapted:
            total += 4 * lin.out_features + 2 * c * lin.out_features + 2 * c * T * lin.out_features
        if lin.name in cfg.ia3_outputs:
            total += c * T * lin.out_features + cast * lin.out_features
        if lin.name in cfg.ia3_inputs:
            total += cast * lin.in_features
    return total


def activation_terms(s: ModelShapes, cfg: EstimateConfig, adapted: tuple[str, ...]) -> dict[str, int]:
    T, c = cfg.batch * cfg.seq, cfg.compute_bytes
    layer = sum(layer_activations(s, cfg, adapted).values())
    # (B, S, H) per layer: what a checkpoint keeps; offloaded: only the layer in backward + the prefetched one
    # (reembed.py: without offload, layer 0's input is looked up again from the ids in backward, not kept)
    # (a multiplier applied outside the embedding module, Granite's, defeats it: that input is kept)
    reembedded = cfg.reembed and not s.layout.scaled_embedding
    kept_layers = 2 if cfg.offload_activations else s.layers - (1 if reembedded else 0)
    terms = {"layer_inputs": kept_layers * c * T * s.hidden,
             # one layer's full set, rebuilt during its backward; its input norm saves the kept input itself
             "recomputed_layer": layer - (c * T * s.hidden if input_kept_as_is(s) else 0)}
    if not cfg.checkpointing:
        terms = {"all_layers": s.layers * layer}
    deq = 0 if cfg.quant == "none" else c * max(lin.numel for lin in s.linears)
    terms["dequantized_weight"] = deq  # (out, in) c: one Linear's weight, dequantized transiently per matmul
    misaligned = [lin.numel for lin in s.linears if lin.in_features % cfg.blocksize]
    if cfg.device == "cpu" and cfg.quant in FOUR_BIT and misaligned:
        # quant.py dequantizes these in plain torch on the CPU (docs/ARCHITECTURE.md, "bitsandbytes hazards"): int64
        # codes + fp32 values of the whole weight are live together (measured: 12 bytes per weight at the step's peak).
        terms["dequant_workspace"] = 12 * max(misaligned)
    if cfg.lora_dropout > 0 and cfg.replay_dropout:
        # dropout_replay.py: backward rebuilds one adapter's dropped input at a time, (T, in) c; on the CPU from
        # its mask, next to the noise (T, in) c; a tiled MLP's adapters do it per tile.
        n = cfg.batch * cfg.mlp_chunk if tiled(cfg) else T
        attn, mlp = layer_linears(s)
        widths = [(n if lin in mlp else T) * lin.in_features for lin in attn + mlp if lin.name in adapted]
        replay = (2 if cfg.device == "cpu" else 1) * c * max(widths, default=0)
        # An adapter's backward runs before its base Linear's (autograd takes the later-built branch first), so
        # this workspace and the base's dequantization workspace are never alive together: the larger one counts.
        exclusive = deq + terms.get("dequant_workspace", 0)
        if not tiled(cfg):
            # Untiled, the decoder backward peaks in the MLP's elementwise backward (silu, mul: the (B, S, I)
            # gradients of backward_grads next to the recomputed (B, S, I) intermediates), where no adapter is
            # replaying: down_proj's adapter replays before those gradients exist, gate's and up's after the
            # intermediates are freed. So the workspace competes with the two (B, S, I) gradients, not adds to
            # them (measured: the seq 4096 / 8192 grid cells were over by exactly this term when it was added).
            exclusive += c * T * 2 * s.active_intermediate
        terms["dropout_replay"] = max(0, replay - exclusive)
    if s.layout.embd_dropout > 0:  # the dropout on the embeddings runs outside the checkpoints: its (B, S, H) mask
        # (CUDA: bool, the CPU: c) is kept from forward to the embeddings' backward
        terms["embedding_dropout"] = (1 if cfg.device == "cuda" else c) * T * s.hidden
    if s.layout.masks:
        terms["attention_masks"] = s.layout.masks * c * cfg.batch * cfg.seq * cfg.seq
    if cfg.device == "cpu" and tiled(cfg):  # each tiled MLP's node keeps torch.get_rng_state(), a 5,056-byte
        # CPU tensor (on CUDA that tensor lives in host memory, not on the device), until the step's end
        terms["rng_states"] = RNG_STATE_BYTES * s.layers
    if tiled(cfg):
        # One tile's MLP recomputed and differentiated at a time: its saved set and (B, N, I) x2 gradients, plus
        # the full-size (B, S, H) input gradient the tiles are written into.
        n = cfg.batch * cfg.mlp_chunk
        terms["mlp_tile"] = (sum(mlp_saved(s, cfg, adapted, n).values()) + c * n * 2 * s.active_intermediate
                             + c * T * s.hidden)
        terms["backward_grads"] = c * T * 2 * s.hidden  # in-flight grads: (B,S,H) x2
    else:
        # in-flight: (B,S,H) x2, (B,S,I) x2
        terms["backward_grads"] = c * T * 2 * (s.hidden + grad_intermediate(s))
    if not s.layout.o_view:  # the output projection's input gradient (B, S, nh*hd) goes back to SDPA's
        # (B, nh, S, hd) output layout as a copy, next to the in-flight gradients
        terms["backward_grads"] += c * T * layer_linears(s)[0][-1].in_features
    return terms


def grad_intermediate(s: ModelShapes) -> int:
    """Width of the (T, I) gradients in flight in an MLP's backward, with the layer's whole saved set live: the
    dense MLP's. A mixture of experts has none such: its experts' backward moments (backward.py's
    _experts_backward) each run with part of the saved set freed."""
    return 0 if s.moe else s.intermediate


def label_tokens(cfg: EstimateConfig) -> int:
    """Positions that reach lm_head: every one that predicts a label (worst case: all labelled, packed rows)."""
    return cfg.batch * (cfg.seq - 1) if cfg.seq > 1 else cfg.batch


def logits_terms(s: ModelShapes, cfg: EstimateConfig) -> dict[str, int]:
    """The loss head (loss.CausalLMLoss): the label positions' hidden states are gathered into one (N, H) tensor
    and go through lm_head in chunks of `loss_chunk` tokens over the whole batch (not per row)."""
    N, c = label_tokens(cfg), cfg.compute_bytes
    chunk = min(cfg.loss_chunk, N)
    # The final RMSNorm runs inside each chunk (lean_norm.py, deferred): its input (C, H) c + rsqrt (C, 1) fp32
    # live only while that chunk is (re)computed.
    return {"final_norm": chunk * (c * s.hidden + (8 if s.layout.norm == "layer" else 4)),
            "final_hidden": c * N * s.hidden,  # (N, H) c: label positions before the final norm, the chunks' input
            # its gradient, (N, H) c: the chunks' backward accumulate their slices into one buffer while h is alive
            "final_hidden_grad": c * N * s.hidden,
            # (C, V) fp32 x3, live together in a chunk's backward: the recomputed log-softmax output (saved by
            # cross_entropy), the nll_loss gradient and the log-softmax gradient (F.cross_entropy's backward).
            "chunk_logits": 3 * 4 * chunk * s.vocab,
            # Gemma 2's tanh(logits / cap) * cap on each chunk: tanh saves its (C, V) fp32 output for backward
            **({"softcap": 4 * chunk * s.vocab} if s.layout.final_logit_softcapping else {})}
