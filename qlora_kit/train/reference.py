"""`train.precompute_reference`: the reference policy's log-probabilities, computed once per example and kept.

Before the first step every training example's answer goes through the quantized base with every adapter off (no
grad, eval mode: preference.PreferenceLoss.reference_logps, the same computation as the in-step reference), in
batches of train.batch_size units. The (examples,) fp32 vector goes to RUN_DIR/reference_logps.safetensors with the
tokenized data's cache key beside it; a resumed run (or a later rank) loads it instead of computing it again. Steps
then look each row up by its example index (data_preference.collate's `example`): no reference forward per step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .. import atomic
from ..data import pipeline as data, tokens as data_tokens
from .preference import precompute
from .prepare import Prepared

FILE = "reference_logps.safetensors"


def attach(p: Prepared, run_dir: Path) -> torch.Tensor:
    """Load the run's stored reference log-probs when they match this data, else compute (and, rank 0, store)
    them; set them on the loss module. Returns them."""
    key = data_tokens.cache_key(p.recipe.data, p.tokenizer)
    path = Path(run_dir) / FILE
    loss_fn = getattr(p.loss_fn, "module", p.loss_fn)
    ref = None
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stored_key = (f.metadata() or {}).get("data")
        if stored_key == key:
            ref = load_file(str(path))["reference_logps"]
    if ref is None or ref.numel() != len(p.dataset.train.tok):
        t0 = time.perf_counter()
        ref = precompute(loss_fn, p.dataset.train, p.recipe.train.batch_size, data.pad_token_id(p.tokenizer),
                         p.accelerator.device)
        if p.world.is_main:
            atomic.write_bytes(path, save({"reference_logps": ref}, metadata={"data": key}))
            print(f"reference log-probabilities of {len(p.dataset.train)} pairs: {time.perf_counter() - t0:.1f} s, "
                  f"kept in {path}", file=sys.stderr)
    loss_fn.reference = ref.to(p.accelerator.device)  # looked up by each batch row's example index
    return ref
