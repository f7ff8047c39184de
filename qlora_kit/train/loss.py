"""Causal-LM loss that never holds the full (B, T, V) fp32 logits.

The peer recipe (transformers' model forward with labels) materialises logits for every position: for a 49k
vocabulary at 4 x 256 tokens that is 200 MB in fp32, plus the same again for the softmax gradient. Here:
1. only positions with a label (the response tokens) go through lm_head at all;
2. they go in chunks of `chunk` tokens, each wrapped in non-reentrant checkpointing, so one chunk's logits
   (chunk, V) fp32 live at a time, in forward and in backward;
3. in training, with a lean final norm (lean_norm.py), the decoder's final RMSNorm runs inside each chunk too:
   the gathered pre-norm (N, H) rows are the only thing kept for the loss head (the norm acts on each position
   alone, so this is the same computation), not the norm's saved input plus a normed copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lowmem.lean_norm import norm_apply
from ..terms import IGNORE


def _chunk_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, norm: nn.Module | None = None
                ) -> torch.Tensor:
    if norm is not None:  # the deferred final norm, on this chunk's (n, H) rows
        hidden = norm_apply(norm, hidden)
    logits = lm_head(hidden).float()  # (n, V) fp32: softmax statistics need the range
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

    def __init__(self, lm_head: nn.Module, chunk: int):
        super().__init__()
        self.lm_head, self.chunk = lm_head, chunk

    def forward(self, h: torch.Tensor, y: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], self.chunk):
            piece = (self.lm_head, h[s : s + self.chunk], y[s : s + self.chunk], norm)
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, *piece, use_reentrant=False)
            else:
                total = total + _chunk_loss(*piece)
        return total


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
        self.model, self.head = model, LossHead(model.get_output_embeddings(), chunk)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                positions: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        if position_ids is not None:
            attention_mask = None  # packed: documents are told apart by the position restarts (packing.py)
        decoder = self.model.get_decoder()
        norm = getattr(decoder, "norm", None)
        if not (getattr(norm, "lean", False) and torch.is_grad_enabled()):
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
        # (B*T, H) view copies only the N label positions.
        h = hidden.reshape(B * T, H).index_select(0, positions)  # (N, H) bf16: only label positions reach lm_head
        y = labels.reshape(-1).index_select(0, positions + 1)  # (N,)
        n = positions.numel()
        if n == 0:
            return hidden.sum() * 0.0, 0
        del hidden  # nothing saved it (index_select keeps indices): (B, T, H) freed before the chunks run
        return self.head(h, y, norm) / n, n
