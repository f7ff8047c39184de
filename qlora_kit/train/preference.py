"""The preference step's forward: per-answer log-probabilities of the policy and of the reference, then the loss.

The reference policy is the same quantized model with every adapter switched off (adapters.methods.disabled), run
under no_grad in eval mode (no dropout) on the same batch before the policy's forward: no second model, no second
copy of any weight; its transient memory is one no-grad forward. `train.precompute_reference` instead computes it
once per example before training (`precompute`, stored in the run folder). Chosen and rejected answers run as one
batch of 2U rows (data_preference.collate); log-probabilities go through lm_head in chunks of label positions, as
loss.py does, so no (B, T, V) fp32 logits exist: one chunk's (chunk, V) at a time, recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import objectives
from ..adapters import methods
from ..config import REFERENCE_OBJECTIVES, TrainConfig
from ..data import pipeline as data, preference as data_preference
from ..lowmem.lean_norm import norm_apply
from ..terms import PROFILER_MARK
from .loss import label_rows

STATS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
N_SUMS = 6  # stats sums: chosen reward, chosen count, rejected reward, rejected count, correct pairs, pairs


def _chunk_logps(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, norm: nn.Module | None
                 ) -> torch.Tensor:
    if norm is not None:  # the deferred final norm on this chunk's (n, H) rows
        hidden = norm_apply(norm, hidden)
    logits = lm_head(hidden).float()  # (n, V) fp32
    return -F.cross_entropy(logits, labels, reduction="none")  # (n,) log p(label)


class LogpHead(nn.Module):
    """forward(h (N, H), y (N,), norm=None) -> (N,) fp32 log p(y) of every row, in checkpointed chunks of `chunk`
    rows. One module around lm_head, as loss.LossHead, so that under FSDP it is one unit (fsdp.shard_root): its
    forward gathers lm_head once for every chunk of a pass."""

    def __init__(self, lm_head: nn.Module, chunk: int):
        super().__init__()
        self.lm_head, self.chunk = lm_head, chunk

    def forward(self, h: torch.Tensor, y: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        pieces = []
        for s in range(0, h.shape[0], self.chunk):
            args = (self.lm_head, h[s : s + self.chunk], y[s : s + self.chunk], norm)
            pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                          else _chunk_logps(*args))
        return torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)


def _mark_no_grad_pass() -> None:
    """A zero-length named range: profiler traces (and measure/'s timeline) see where a no-grad pass starts."""
    with torch.profiler.record_function(PROFILER_MARK + "reference"):
        pass


def summarize(sums: list[float]) -> dict[str, float]:
    """The step's stats sums (N_SUMS, over micro-batches and ranks) -> mean rewards, margin and pair accuracy (kto:
    no pairs, so no accuracy)."""
    rc, nc, rr, nr, correct, pairs = sums
    out = {"rewards_chosen": rc / max(nc, 1), "rewards_rejected": rr / max(nr, 1)}
    out["reward_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    if pairs:
        out["reward_accuracy"] = correct / pairs
    return out


class PreferenceLoss(nn.Module):
    """forward(input_ids, attention_mask, labels, desirable, positions=None, example=None) -> (mean loss over the
    batch's units, stats sums (N_SUMS,) fp32). A module so that accelerate/DDP can wrap it like CausalLMLoss."""

    def __init__(self, model: nn.Module, t: TrainConfig):
        super().__init__()
        self.model, self.head, self.t = model, LogpHead(model.get_output_embeddings(), t.loss_chunk), t
        self.reference: torch.Tensor | None = None  # precomputed: (examples,) fp32 log-probs by Tokenized index

    def seq_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(R,) fp32 summed log-probabilities of each row's label tokens, (R,) fp32 label-token counts."""
        # the final norm deferred with and without gradients alike: policy and reference rows get identical values
        h, y, positions, norm = label_rows(self.model, input_ids, attention_mask, labels, positions)
        R, T = labels.shape
        tok = self.head(h, y, norm)  # (N,) fp32
        rows = torch.div(positions, T, rounding_mode="floor")
        logps = torch.zeros(R, dtype=torch.float32, device=tok.device).index_add(0, rows, tok)
        counts = torch.zeros(R, dtype=torch.float32, device=tok.device).index_add(0, rows, torch.ones_like(tok))
        if h.shape[0] == 0:
            logps = logps + h.sum() * 0.0  # keep the graph (DDP / accumulation expect a backward)
        return logps, counts

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, labels, positions=None) -> torch.Tensor:
        """The base's log-probabilities: every adapter off, eval mode (no dropout), no autograd graph."""
        _mark_no_grad_pass()
        was = self.model.training
        self.model.eval()
        try:
            with methods.disabled(self.model):
                return self.seq_logps(input_ids, attention_mask, labels, positions)[0]
        finally:
            self.model.train(was)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                desirable: torch.Tensor, positions: torch.Tensor | None = None,
                example: torch.Tensor | None = None, reference_only: bool = False, kl_only: bool = False,
                z0: torch.Tensor | None = None):
        """reference_only: just the reference log-probs (R,); kl_only (kto): just the batch's kl sums (2,) (both go
        through forward, so that under FSDP the root unit's parameters are gathered). z0 (kto): the step's reference
        point (step_z0); None: this batch's own."""
        t = self.t
        if reference_only:
            return self.reference_logps(input_ids, attention_mask, labels, positions)
        if kl_only:
            return self.kl_sums(input_ids, attention_mask, labels)
        if t.objective == "kto":
            return self._kto(input_ids, attention_mask, labels, desirable, z0)
        ref = None
        if t.objective in REFERENCE_OBJECTIVES:
            if self.reference is not None and example is not None:
                ref = self.reference.to(input_ids.device)[example]
            else:
                ref = self.reference_logps(input_ids, attention_mask, labels, positions)
        logps, counts = self.seq_logps(input_ids, attention_mask, labels, positions)
        pc, pr, nc, nr = logps[0::2], logps[1::2], counts[0::2], counts[1::2]
        if t.objective == "dpo":
            losses, wc, wr = objectives.dpo(pc, pr, ref[0::2], ref[1::2], t.beta, t.label_smoothing)
        elif t.objective == "ipo":
            losses, wc, wr = objectives.ipo(pc, pr, ref[0::2], ref[1::2], t.beta)
        elif t.objective == "orpo":
            losses, wc, wr = objectives.orpo(pc, pr, nc, nr, t.beta)
        elif t.objective == "simpo":
            losses, wc, wr = objectives.simpo(pc, pr, nc, nr, t.beta, t.simpo_gamma)
        else:
            raise ValueError(f"not a preference objective: {t.objective}")
        n = float(pc.numel())
        sums = torch.stack([wc.sum(), wc.new_tensor(n), wr.sum(), wc.new_tensor(n), (wc > wr).float().sum(),
                            wc.new_tensor(n)])
        return losses.mean(), sums

    @torch.no_grad()
    def kl_sums(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """kto: objectives.kl_sums of the batch's mismatched rows (2i+1): the policy as it trains (adapters on, its
        dropout) and the reference, both without gradients."""
        kl = (input_ids[1::2], attention_mask[1::2], labels[1::2])
        _mark_no_grad_pass()
        ref = self.reference_logps(*kl)
        return objectives.kl_sums(self.seq_logps(*kl)[0], ref)

    def _kto(self, input_ids, attention_mask, labels, desirable, z0=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 2i: the answers (with gradients); rows 2i+1: mismatched pairs, read only for z0 when the step's z0
        is not given."""
        t = self.t
        if z0 is None:
            z0 = objectives.kto_z0(self.kl_sums(input_ids, attention_mask, labels))
        ans = (input_ids[0::2], attention_mask[0::2], labels[0::2])
        ref = self.reference_logps(*ans)  # (U,) one no-grad pass over the answers
        logps = self.seq_logps(*ans)[0]
        d = desirable[0::2].bool()
        losses, reward, _ = objectives.kto(logps, ref, d, z0, t.beta, t.kto_desirable_weight,
                                           t.kto_undesirable_weight)
        df = d.float()
        sums = torch.stack([(reward * df).sum(), df.sum(), (reward * (1 - df)).sum(), (1 - df).sum(),
                            reward.new_zeros(()), reward.new_zeros(())])
        return losses.mean(), sums


@torch.no_grad()
def step_z0(loss: nn.Module, batches, device, all_reduce=None) -> torch.Tensor:
    """kto's z0 over a whole optimizer step: a no-grad pre-pass over every micro-batch's mismatched rows, their kl
    sums added, then (several ranks) summed across ranks by `all_reduce` (in place, on a list of tensors), so z0 is
    the mean over every mismatched pair of the step, however it is split. `loss`: PreferenceLoss, maybe wrapped."""
    sums = torch.zeros(2, dtype=torch.float32, device=device)
    for b in batches:
        b = {k: b[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels", "desirable")}
        sums += loss(b["input_ids"], b["attention_mask"], b["labels"], b["desirable"], kl_only=True)
    if all_reduce is not None:
        all_reduce([sums])
    return objectives.kto_z0(sums)


@torch.no_grad()
def precompute(loss: PreferenceLoss, units: data.Units, batch_size: int, pad_id: int, device) -> torch.Tensor:
    """(examples,) fp32: the reference log-probability of every example of `units`, by Tokenized index (0 for the
    examples `units` does not hold)."""
    out = torch.zeros(len(units.tok), dtype=torch.float32)
    for s in range(0, len(units), batch_size):
        batch = {k: v.to(device) for k, v in data_preference.collate(units[s : s + batch_size], pad_id).items()}
        ref = loss(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["desirable"],
                   reference_only=True).cpu()
        out[batch["example"].cpu()] = ref
    return out


@torch.no_grad()
def evaluate(loss: PreferenceLoss, units: data.Units, batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Mean loss over `units` and the rewards' summary (eval mode: no dropout), batch by batch in order."""
    model = loss.model
    was = model.training
    model.eval()
    total, n, sums = 0.0, 0, torch.zeros(N_SUMS, dtype=torch.float64)

    def batches():  # collated as read, twice for kto (z0 over every eval answer, then the losses)
        return (data_preference.collate(units[s : s + batch_size], pad_id) for s in range(0, len(units), batch_size))

    try:
        z0 = step_z0(loss, batches(), device) if loss.t.objective == "kto" else None
        for batch in batches():
            picked = batch["input_ids"].shape[0] // 2
            batch = {k: v.to(device) for k, v in batch.items()}
            value, part = loss(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["desirable"],
                               z0=z0)
            total, n = total + float(value) * picked, n + picked
            sums += part.double().cpu()
    finally:
        model.train(was)
    return {"loss": total / max(n, 1), **summarize(sums.tolist())}

