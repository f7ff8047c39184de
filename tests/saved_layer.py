"""What autograd keeps while the last decoder layer of a model runs, as qlora-kit trains it (prepare(), no
checkpointing): saved-tensor hooks count each storage once, the frozen weights and buffers aside; next to the
estimate's per-layer terms for the same recipe (tests/test_estimate_moe_saved.py, test_estimate_gpt2_saved.py)."""

import json
from pathlib import Path

import torch

from qlora_kit.estimate import analytic as me
from qlora_kit.measure.breakdown import MeasureConfig, estimate_config, recipe_for, synthetic_batch


def last_layer_saved(folder: Path, B: int, S: int, dropout: float):
    """(the prepared run, bytes saved by the last layer's forward on a random (B, S) batch, the estimate's terms)."""
    from qlora_kit.train import loop as train

    data = folder.parent / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    cfg = MeasureConfig(model=str(folder), seq=S, batch=B, rank=8, dropout=dropout, threads=1,
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

    last = (decoder.layers if hasattr(decoder, "layers") else decoder.h)[-1]  # GPT-2 keeps its blocks in .h
    last.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    last.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    config = json.loads((folder / "config.json").read_text())
    ids = synthetic_batch(config["vocab_size"], B, S, 0)["input_ids"]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=ids)
    s = me.count_params(config)
    ec = estimate_config(recipe, "cpu")
    return p, sum(saved.values()), me.layer_activations(s, ec, me.resolve_targets(s, ec.targets))
