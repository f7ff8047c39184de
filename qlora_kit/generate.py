"""Load a model for inference (a base, a run, or an adapter over a base) and answer prompts.

The quantized base is loaded exactly as in training (same quant settings from the run's recipe.yaml), the
adapter is injected as LoRALinear and its tensors copied in: what you ask is what was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import data, lora, peft_format
from .config import ModelConfig, QuantConfig, Recipe, load_recipe
from .errors import ModelError
from .model import load_base
from .quant import DTYPES
from .run_dir import is_run_dir


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    data_format: str = "alpaca"
    system_prompt: str | None = None


def _attach(model: torch.nn.Module, adapter: peft_format.Adapter, dtype: torch.dtype) -> None:
    spec = lora.LoraSpec(adapter.r, adapter.alpha, 0.0, "kaiming", adapter.rslora, dtype)
    modules = adapter.modules()
    present = set(lora.linear_names(model))
    missing = [m for m in modules if m not in present]
    if missing:
        raise ModelError(f"the adapter targets modules the base does not have, e.g. {missing[:3]}: "
                         "it was trained on a different model; pass the right --base.")
    lora.inject(model, modules, spec)  # full names match exactly (lora.match_targets' list rule)
    try:
        lora.load_adapter_state(model, adapter.tensors)
    except ValueError as e:
        raise ModelError(f"the adapter does not fit the base: {e}. Pass the base it was trained on with --base.") from None


def load(path: str, base: str | None = None, quant: QuantConfig | None = None, device: str = "cpu",
         allow_pickle: bool = False, trust_remote_code: bool = False) -> Loaded:
    """`path` is a run folder, a PEFT adapter folder (base from --base or its config), or a model (folder/name).
    allow_pickle / trust_remote_code (the CLI flags) add to what a run's recipe already allows, never remove."""
    p = Path(path)
    if p.is_dir() and is_run_dir(p):
        recipe: Recipe = load_recipe(p / "recipe.yaml")
        adapter = peft_format.load_adapter(p / "adapter")
        model_cfg = ModelConfig(base or recipe.model.path, recipe.model.dtype, recipe.model.allow_pickle or allow_pickle,
                                recipe.model.trust_remote_code or trust_remote_code)
        model, tok, _ = load_base(model_cfg, quant or recipe.quant, device)
        _attach(model, adapter, DTYPES[recipe.quant.compute_dtype])
        loaded = Loaded(model, tok, recipe.data.format, recipe.data.system_prompt)
    elif p.is_dir() and (p / peft_format.CONFIG_NAME).is_file():
        adapter = peft_format.load_adapter(p)
        base = base or adapter.base_model
        if not base:
            raise ModelError(f"{p}: the adapter does not name its base model; pass --base MODEL.")
        model, tok, _ = load_base(ModelConfig(base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code),
                                  quant or QuantConfig(), device)
        _attach(model, adapter, torch.bfloat16)
        loaded = Loaded(model, tok)
    else:
        model, tok, _ = load_base(ModelConfig(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code),
                                  quant or QuantConfig(), device)
        loaded = Loaded(model, tok)
    loaded.model.eval()
    loaded.model.config.use_cache = True
    return loaded


@torch.no_grad()
def answer(loaded: Loaded, prompts: list[str], max_new_tokens: int = 64, raw: bool = False,
           temperature: float = 0.0) -> list[str]:
    """Greedy (or sampled) answers, one per prompt. Prompts are rendered as in training unless `raw`."""
    tok, model = loaded.tokenizer, loaded.model
    outs = []
    for prompt in prompts:  # one at a time: no padding questions, and CPU batches of 1 are fast enough here
        ids = (tok(prompt, add_special_tokens=True)["input_ids"] if raw
               else data.encode_prompt(prompt, tok, loaded.data_format, loaded.system_prompt))
        x = torch.tensor([ids], device=next(model.parameters()).device)
        kwargs = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           pad_token_id=data.pad_token_id(tok), **kwargs)
        outs.append(tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip())
    return outs
