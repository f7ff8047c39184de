"""Causal-LM loss that never holds the full (B, T, V) fp32 logits.

The peer recipe (transformers' model forward with labels) materialises logits for every position: for a 49k
vocabulary at 4 x 256 tokens that is 200 MB in fp32, plus the same again for the softmax gradient. Here:
1. only positions with a label (the response tokens) go through lm_head at all;
2. they go in chunks of `chunk` tokens, each wrapped in non-reentrant checkpointing, so one chunk's logits
   (chunk, V) fp32 live at a time, in forward and in backward;
3. in training, with a lean final norm (lean_norm.py), the decoder's final RMSNorm runs inside each chunk too:
   the gathered pre-norm (N, H) rows are the only thing kept for the loss head (the norm acts on each position
   alone, so this is the same computation), not the norm's saved input plus a normed copy;
4. what the model's own forward does to lm_head's output before its loss (Gemma 2/3's tanh softcapping, Cohere's
   and Granite's logit scales) runs on each chunk's fp32 logits, from one table of config keys (POST_HEAD).
   `check_head` proves, on the loaded model, that this equals the model's own forward with labels, so an
   architecture with a transform the table lacks is refused, never trained on a different loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ModelError
from ..lowmem.lean_norm import norm_apply
from ..terms import IGNORE

# Every transform a causal LM's forward applies to lm_head's output before the loss (transformers 5 modeling code,
# ForCausalLM.forward), keyed by the config field that switches it on; applied in this order when several are set.
POST_HEAD = (
    ("logit_scale", "multiply"),  # Cohere, Cohere 2: logits * logit_scale
    ("logits_scaling", "divide"),  # Granite (and its MoE / hybrid variants): logits / logits_scaling
    ("final_logit_softcapping", "softcap"),  # Gemma 2, Gemma 3, VaultGemma: tanh(logits / cap) * cap
    ("logits_soft_cap", "softcap"),  # RecurrentGemma
)


def post_head(config) -> tuple[tuple[str, float], ...]:
    """((op, value), ...) of the model's post-lm_head transforms, from its (text) config; () for plain models."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    ops = []
    for key, op in POST_HEAD:
        value = getattr(text, key, None)
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
            ops.append((op, float(value)))
    return tuple(ops)


def apply_post_head(logits: torch.Tensor, ops: tuple[tuple[str, float], ...]) -> torch.Tensor:
    """logits (..., V) as the model's forward leaves them after lm_head (`ops` from post_head), in logits' dtype."""
    for op, v in ops:
        logits = logits * v if op == "multiply" else logits / v if op == "divide" else torch.tanh(logits / v) * v
    return logits


def _chunk_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, norm: nn.Module | None = None,
                ops: tuple = ()) -> torch.Tensor:
    if norm is not None:  # the deferred final norm, on this chunk's (n, H) rows
        hidden = norm_apply(norm, hidden)
    logits = apply_post_head(lm_head(hidden).float(), ops)  # (n, V) fp32: softmax statistics need the range
    return F.cross_entropy(logits, labels, reduction="sum")


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """(N,) int64 indices into the flattened (B*T) sequence of the positions that predict a label: position
    b*T + t predicts labels[b, t+1]. Call it on the CPU batch: it is a data-dependent size (a host sync on a GPU)."""
    B, T = labels.shape
    keep = labels[:, 1:] != IGNORE  # (B, T-1) bool
    t = keep.reshape(-1).nonzero().squeeze(1)  # (N,) into (B*(T-1))
    return t + t // (T - 1) if T > 1 else t  # -> into (B*T): skip each row's last position


class LossHead(nn.Module):
    """forward(h (N, H), y (N,), norm=None) -> the summed cross-entropy (fp32 scalar) of every chunk of `chunk`
    rows; `norm`: the decoder's deferred final norm, applied per chunk (h is then the pre-norm hidden state).

    One module for lm_head and every chunk, so that under FSDP it is one unit (fsdp.shard_root shards it before the
    root): lm_head is gathered once for all chunks of a micro-batch, freed after the forward, gathered again when
    backward reaches the loss, and freed before the decoder's backward starts (an lm_head of 128k x 8192 bf16 is
    2 GiB)."""

    def __init__(self, lm_head: nn.Module, chunk: int, ops: tuple[tuple[str, float], ...] = ()):
        super().__init__()
        self.lm_head, self.chunk, self.ops = lm_head, chunk, ops  # ops: post_head(config)

    def forward(self, h: torch.Tensor, y: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], self.chunk):
            piece = (self.lm_head, h[s : s + self.chunk], y[s : s + self.chunk], norm, self.ops)
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, *piece, use_reentrant=False)
            else:
                total = total + _chunk_loss(*piece)
        return total


def label_rows(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
               positions: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
               defer_norm: bool = True):
    """The decoder's hidden rows at the label positions, what every loss head reads: (h (N, H), y (N,), positions
    (N,) into the flattened (B*T), the deferred final norm or None). With a lean final norm and `defer_norm`, h is
    the pre-norm hidden state and the head applies the norm per chunk (lean_norm.py)."""
    decoder = model.get_decoder()
    norm = getattr(decoder, "norm", None)
    if not (getattr(norm, "lean", False) and defer_norm):
        norm = None  # the decoder applies its own final norm
    if norm is not None:
        norm.deferred = True
    try:  # use_cache=False: a training forward needs no KV cache, and with one transformers skips packed detection
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # (B, T, H), before the final norm if deferred
    finally:
        if norm is not None:
            norm.deferred = False
    B, T, H = hidden.shape
    if positions is None:
        positions = label_positions(labels).to(hidden.device)
    # Position p = b*T + t predicts token labels[b, t+1] = flat labels[p + 1]; gathering rows of the contiguous
    # (B*T, H) view copies only the N label positions (nothing keeps the (B, T, H) tensor after this returns).
    h = hidden.reshape(B * T, H).index_select(0, positions)  # (N, H) bf16: only label positions reach lm_head
    y = labels.reshape(-1).index_select(0, positions + 1)  # (N,)
    return h, y, positions, norm


class CausalLMLoss(nn.Module):
    """forward(input_ids, attention_mask, labels, positions=None, position_ids=None) -> (mean loss over label
    tokens, label tokens).

    `positions` (N,) int64 from `label_positions` on the CPU batch (then moved to the device) lets the forward
    gather the label positions without a data-dependent boolean index, i.e. without a host sync on a GPU; without
    it they are found here. `position_ids` (B, T), from a packed batch (packing.py), restart at 0 for each
    document: the model then runs with attention_mask=None so that transformers builds the block-diagonal causal
    mask from them (a 2-D padding mask would switch that detection off). A module (not a function) so that
    accelerate/DDP can wrap it: gradient sync happens in its forward."""

    def __init__(self, model: nn.Module, chunk: int = 256):  # config.TrainConfig.loss_chunk
        super().__init__()
        check_head(model)  # the loss below is the model's own, or a ModelError now
        self.model, self.head = model, LossHead(model.get_output_embeddings(), chunk, post_head(model.config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                positions: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        if position_ids is not None:
            attention_mask = None  # packed: documents are told apart by the position restarts (packing.py)
        h, y, positions, norm = label_rows(self.model, input_ids, attention_mask, labels, positions, position_ids,
                                           defer_norm=torch.is_grad_enabled())
        n = positions.numel()
        if n == 0:
            return h.sum() * 0.0, 0
        return self.head(h, y, norm) / n, n


class _Stand(nn.Module):
    """Stands in for the decoder in check_head: zeros (B, T, H) as its last hidden state, no layer runs."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.hidden, self.dtype, self.device = hidden, dtype, device

    def forward(self, input_ids=None, **kwargs):
        # the MoE output class: a mixture's forward reads `router_logits` off its decoder's output (gpt-oss always);
        # None, as a decoder returns it when router logits are not asked for
        from transformers.modeling_outputs import MoeModelOutputWithPast

        B, T = input_ids.shape
        return MoeModelOutputWithPast(last_hidden_state=torch.zeros(B, T, self.hidden, dtype=self.dtype,
                                                                     device=self.device))


class _FixedLogits(nn.Module):
    """Stands in for lm_head in check_head: returns the fixed logits (B, T, V) fp32 for the last positions asked."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logits[:, -h.shape[1]:] if h.dim() == 3 else self.logits.reshape(-1, self.logits.shape[-1])


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at `name` in `model`; returns what was there."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old


def check_head(model: nn.Module, batch: int = 2, length: int = 6) -> None:
    """Refuse (ModelError) a model whose own forward-with-labels loss is not CausalLMLoss's on the same logits.

    lm_head is stood in for by fixed fp32 logits in [-60, 60], large enough for any softcap or scale to move them;
    the model's forward with labels then computes its loss on exactly those, so the comparison is exact to fp32
    rounding, whatever the weights, the quantization or a bf16 decoder would round. The decoder is stood in for by
    zeros too, so no weight of the model is touched (under FSDP none is gathered): only the model's own code after
    the decoder runs. A forward that needs more of its decoder than `last_hidden_state` runs the real decoder on
    these few tokens instead."""
    head = model.get_output_embeddings()
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if head_name is None or getattr(head, "weight", None) is None:
        raise ModelError(f"{type(model).__name__} has no output embeddings (lm_head); qlora-kit trains causal LMs "
                         "whose logits come from one.")
    V, device, dtype = head.weight.shape[0], head.weight.device, head.weight.dtype
    g = torch.Generator().manual_seed(0)
    fake = (torch.rand(batch, length, V, generator=g) * 120 - 60).to(device)  # (B, T, V) fp32
    ids = torch.randint(0, V, (batch, length), generator=g).to(device)
    labels = ids.clone()
    labels[0, : length // 2] = IGNORE  # a masked prompt, as in training data
    ops = post_head(model.config)
    stand_in = _FixedLogits(fake)
    was_training = model.training
    model.eval()
    decoder = [n for n, m in model.named_children() if m is model.get_decoder()]
    _swap(model, head_name, stand_in)
    try:
        with torch.no_grad():
            out = None
            if decoder:
                real = _swap(model, decoder[0], _Stand(text.hidden_size, dtype, device))
                try:
                    out = model(input_ids=ids, labels=labels, use_cache=False)
                except Exception:  # a forward that reads more of its decoder: run the real one on these tokens
                    out = None
                finally:
                    _swap(model, decoder[0], real)
            if out is None:
                out = model(input_ids=ids, labels=labels, use_cache=False)
    finally:
        _swap(model, head_name, head)
        model.train(was_training)
    if not stand_in.calls:
        raise ModelError(f"{type(model).__name__}'s forward does not compute its logits through its output "
                         "embeddings module (lm_head), which qlora-kit's chunked loss does: not supported.")
    logits = apply_post_head(fake, ops)
    y = labels[:, 1:].reshape(-1)
    ours = F.cross_entropy(logits[:, :-1].reshape(-1, V), y, ignore_index=IGNORE)
    theirs = out.loss.float() if out.loss is not None else None
    same_logits = out.logits.shape == logits.shape and torch.allclose(out.logits.float(), logits, rtol=1e-5,
                                                                      atol=1e-4)
    if theirs is None or not same_logits or abs(float(ours) - float(theirs)) > 1e-5 * max(1.0, abs(float(theirs))):
        applied = ", ".join(f"{op} {v:g}" for op, v in ops) or "nothing"
        raise ModelError(
            f"{type(model).__name__} ({model.config.model_type}): its own forward computes a different loss than "
            f"qlora-kit's chunked loss on the same lm_head output (model {float(theirs or float('nan')):.6f}, "
            f"qlora-kit {float(ours):.6f}; qlora-kit applied {applied} after lm_head, from the config keys "
            f"{', '.join(k for k, _ in POST_HEAD)}). The model transforms its logits in a way qlora-kit does not "
            "know, so training would optimise a different loss: this architecture is not supported yet.")
