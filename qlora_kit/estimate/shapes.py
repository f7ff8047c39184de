"""Parameter shapes of a decoder: every quantizable Linear (and expert) of the decoder layers, the parameters that
stay unquantized, and the layout facts activation memory depends on. count.py builds them from a config.json dict
by the per-family rules of families.py (dense) and families_moe.py (mixtures of experts)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinearShape:
    name: str  # module (or fused expert parameter) name inside a decoder layer: q_proj, ..., down_proj, c_fc
    in_features: int
    out_features: int
    bias: bool
    layers: int = 1  # decoder layers that have it (DeepSeek's first layers are dense, the others MoE)
    experts: int = 1  # copies per layer: the routed experts of a fused (E, out, in) expert tensor, else 1
    path: str = ""  # where it sits inside a decoder layer: self_attn.q_proj, mlp.experts.gate_up_proj
    group: str = ""  # Linears that read the same input tensor share a group (q/k/v: "qkv"); "" = its own name

    @property
    def numel(self) -> int:
        """Weights of ONE instance (one expert of one layer)."""
        return self.in_features * self.out_features

    @property
    def count(self) -> int:
        """Instances in the whole model: layers x experts."""
        return self.layers * self.experts

    @property
    def input_group(self) -> str:
        return self.group or self.path or self.name


@dataclass(frozen=True)
class Moe:
    """A sparse MLP: `experts` routed experts of width `intermediate`, `top_k` of them per token, and an always-on
    shared expert of width `shared` (0: none), in `layers` of the decoder layers."""
    experts: int
    top_k: int
    intermediate: int
    shared: int
    layers: int
    shared_gate: bool = False  # the shared expert's output is scaled by sigmoid(a (H -> 1) gate) (Qwen2-MoE)
    weights_fp32: bool = True  # the router hands the experts fp32 routing weights (Mixtral, DeepSeek), not c
    shared_last: bool = False  # the shared expert runs after the routed experts (DeepSeek): its backward runs first


@dataclass(frozen=True)
class Layout:
    """How a decoder layer computes, as far as activation memory goes (the Llama layout is the default)."""
    norm: str = "lean"  # what a full-width norm saves, per token: lean (lean_norm.py: the 16-bit input + rsqrt),
    # rms32 (transformers' RMSNorm: an fp32 copy + rsqrt), layer (torch's LayerNorm: the input + mean, rstd),
    # cohere (CohereLayerNorm in fp32: two fp32 copies + rstd)
    norms_per_layer: int = 2  # full-width norms in one layer (Gemma 2/3: 4, Cohere/Phi/Falcon: 1)
    input_norm: bool = True  # a norm before attention (OLMo 2 has none: q/k/v read the layer input itself)
    weight_copy: bool = False  # the norm multiplies by an fp32 copy of (1 + weight) / weight (Gemma, Cohere): (H,)
    gated: bool = True  # act(gate(x)) * up(x) (3 intermediates saved) or act(fc1(x)) (act_saved)
    glu_saved: int = 3  # (T, I) widths a gated MLP saves before down_proj: gate and up (one (T, 2I) tensor or two)
    # and the activation's output; gpt-oss's clamped GLU 6: gate_up (T, 2I), clamped gate, sigmoid, up + 1, glu
    act_saved: int = 1  # (T, I) tensors a plain MLP's activation saves: native gelu 1, gelu_new (tanh formula) 4
    parallel: bool = False  # attention and MLP read the same normed input (Phi, Cohere, Falcon)
    norms_share_input: bool = False  # the norm before the MLP reads the layer input itself, as the input norm
    # does (GPT-NeoX's parallel residual: two LayerNorms over x): that (T, H) tensor is saved once, not twice
    o_view: bool = True  # the output projection reads a view of SDPA's output; False where q was rebuilt by a cat
    # (partial or fused-qkv rotary: Phi, Phi-3, StableLM, Falcon) or eager attention made it (B, nh, S, hd): then
    # its (B, S, nh*hd) input is a copy that its adapter saves
    dense_mask: bool = False  # each layer hands SDPA its own (B, 1, S, S) additive mask in c, which SDPA saves (Falcon)
    masks: int = 0  # (B, 1, S, S) c masks the model builds once per step and every layer reads (Falcon: 1;
    # Gemma 2's eager attention: a full and a sliding-window one)
    eager: bool = False  # attention as explicit (B, nh, S, S) scores (Gemma 2: its logits softcapping needs it)
    sinks: bool = False  # eager attention with a learned sink column per head (gpt-oss): softmax over S + 1 columns
    latent_norms: tuple[int, ...] = ()  # widths of the RMSNorms on attention latents (DeepSeek: q_a, kv_a)
    latent_beside: int = 0  # columns next to a latent in the tensor the norm reads a split view of (DeepSeek: the
    # rope part of kv_a_proj_with_mqa's (T, kv_rank + rope) output): a lean norm saving the view keeps them too
    post_norm: bool = False  # a norm after the MLP, before the residual add (Gemma 2/3, OLMo 2): its backward runs
    # first in the layer's, with every saved tensor of the layer still live
    residual_scale: bool = False  # each branch's output is scaled before the residual add (Granite's multiplier)
    scaled_embedding: bool = False  # layer 0 reads the embedding times a multiplier computed outside the embedding
    # module (Granite), or plus learned positions (GPT-2's wpe): not the module's own output, so reembed.py cannot
    # look it up again and it is kept
    qk_norm: int = 0  # per-token width normalised by q/k norms (Qwen3: (nh + nkv) * hd)
    qk_norm_vectors: int = 0  # rsqrt values per token: 0 = one per head (nh + nkv); OLMo 2 normalises q, k whole: 2
    qk_norm_fp32: bool = False  # q/k norms are transformers' own (fp32 copies), not lean
    attn_dropout: float = 0.0  # the model's own dropout on the attention probabilities while training (GPT-2's
    # attn_pdrop): SDPA gets dropout_p > 0
    resid_dropout: float = 0.0  # its dropout on each branch's (T, H) output before the residual add (resid_pdrop)
    embd_dropout: float = 0.0  # its dropout on the embeddings before layer 0 (embd_pdrop)
    q: int = 0  # per-token widths of the attention's q, k, v as SDPA saves them
    k: int = 0
    v: int = 0  # a fused q/k/v projection's v is a view that keeps the projection's whole output: its width
    sliding_window: int | None = None  # reported; it changes no saved tensor: SDPA saves q, k, v, out and the
    # logsumexp whatever the window, and eager attention (Gemma 2) builds full (B, nh, S, S) scores and masks anyway
    final_logit_softcapping: float | None = None  # tanh(logits / cap) * cap on every loss chunk
    logit_scale: bool = False  # logits * scale (Cohere) or / scale (Granite): one more (C, V) fp32 per chunk


@dataclass(frozen=True)
class ModelShapes:
    """Parameter shapes of a decoder-only model. `linears` are the quantized weights: each carries its count."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    tied: bool
    linears: tuple[LinearShape, ...]
    other: dict[str, int]  # numel of the parameters that stay unquantized, by name (routers included)
    moe: Moe | None = None
    layout: Layout = field(default_factory=Layout)

    @property
    def linear_params(self) -> int:
        return sum(lin.count * lin.numel for lin in self.linears)

    @property
    def total(self) -> int:
        return self.linear_params + sum(self.other.values())

    @property
    def active(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to (top_k of E per layer)."""
        idle = sum(lin.layers * (lin.experts - self.moe.top_k) * (lin.numel + lin.out_features * lin.bias)
                   for lin in self.linears if lin.experts > 1) if self.moe else 0
        return self.total - idle

    @property
    def active_intermediate(self) -> int:
        """MLP width one token runs through: the dense MLP's, or top_k experts' + the shared expert's."""
        if self.moe is None:
            return self.intermediate
        return self.moe.top_k * self.moe.intermediate + self.moe.shared
