"""`qlora-kit eval`: mean loss per token and perplexity of any model source over a data set.

What compression cost is a number: the same data, the same loss as training, measured on
    a model folder or built-in name   the base, quantized while loading as --quant says (default none: as stored);
    a run folder                      its quantized base + adapter, exactly as trained (recipe.yaml's quant);
    a PEFT adapter folder             over its base (--base, else the adapter's base_model_name_or_path);
    a merged export                   a model folder like any other;
    a GGUF file                       through qlora-kit's GGUF reader (export/gguf/reader.py; weights dequantized
                                      to --dtype), every family the GGUF export writes.

Data goes through qlora_kit.data.pipeline, so every format training reads works and the label mask is training's: prompt
tokens take no loss (alpaca, chat) unless `all_tokens`; `text` takes loss on every token. The loss is training's
CausalLMLoss (train.evaluate), summed in float64 over label tokens in file order: the result does not depend on the
batch size beyond bf16 rounding, and a run's own validation split gives exactly the val_loss training logged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch

from . import generate
from ..data import pipeline as data
from ..config import DataConfig, QuantConfig, Recipe
from ..errors import ConfigError, DataError
from ..train.loss import CausalLMLoss
from ..run.folder import is_run_dir

Kind = Literal["model", "run", "adapter", "gguf"]


@dataclass(frozen=True)
class Request:
    source: str
    data: str | None = None
    """A data file, a built-in data set name (pydoc_text.BUILTIN), or None: a run's own validation split."""
    format: str | None = None
    """Data format; default: a run's recipe data.format, else text."""
    all_tokens: bool = False
    """Loss on every token, prompts included (recipe data.train_on_prompt)."""
    max_length: int | None = None
    """Tokens per example (longer ones are cut); default: a run's data.max_length, else 1024."""
    max_examples: int | None = None
    batch_size: int = 8
    quant: str | None = None
    """Base quantization; default: a run's recipe, else none (the model as stored)."""
    base: str | None = None
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """GGUF files only: the dtype its weights are dequantized to."""
    read_gguf: Callable | None = None
    """GGUF files only: the reader, qlora_kit.export.gguf.reader.load (generate.load_gguf: why it is passed)."""
    device: str = "cpu"
    fast: bool = True
    """Dequantize the frozen base once (inference.densify) when memory allows; the numbers do not change."""
    allow_pickle: bool = False
    trust_remote_code: bool = False
    objective: str | None = None
    """Preference data: the objective whose loss is reported (default: a run's train.objective, else dpo)."""
    beta: float | None = None
    """Preference data: the objective's beta (default: a run's train.beta, else 0.1)."""


@dataclass
class Result:
    source: str
    kind: Kind
    data: str
    format: str
    masked: bool  # prompt tokens excluded from the loss
    examples: int
    tokens: int  # label tokens the mean is over
    loss: float  # mean cross-entropy per label token, nats
    perplexity: float
    quant: str
    seconds: float
    stats: dict = field(default_factory=dict)
    preference: dict = field(default_factory=dict)  # objective, beta, reward_accuracy, reward_margin, rewards_*

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("source", "kind", "data", "format", "masked", "examples", "tokens",
                                             "loss", "perplexity", "quant", "seconds")}
        return d | {"tokens_per_s": round(self.tokens_per_s, 1), "data_stats": self.stats} | self.preference


def kind_of(source: str) -> Kind:
    p = Path(source).expanduser()
    if generate.is_gguf(source):
        return "gguf"
    if p.is_dir() and is_run_dir(p):
        return "run"
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return "adapter"
    return "model"


def load(req: Request) -> tuple[generate.Loaded, Kind, Recipe | None, str]:
    """(loaded model, source kind, the run's recipe or None, a description of the base quantization)."""
    kind = kind_of(req.source)
    if kind == "gguf":
        if req.quant not in (None, "none"):
            raise ConfigError("--quant applies to model folders and runs; a GGUF file is evaluated as its own "
                              "quantization, dequantized. Drop --quant.")
        return generate.load_gguf(req.source, req.dtype, req.device, req.read_gguf), kind, None, f"gguf ({req.dtype})"
    recipe = None
    if kind == "run":
        from ..config import load_recipe

        recipe = load_recipe(Path(req.source).expanduser() / "recipe.yaml")
    # no --quant: generate.default_quant (a run as trained, an adapter over nf4, a model folder as stored)
    q = QuantConfig(type=req.quant) if req.quant else generate.default_quant(req.source, recipe)
    loaded = generate.load(req.source, base=req.base, quant=q, device=req.device,
                           allow_pickle=req.allow_pickle, trust_remote_code=req.trust_remote_code)
    desc = q.type if q.type in ("none", "int8") else (
        f"{q.type} blocksize {q.blocksize}" + (" + double quant" if q.double_quant else ""))
    return loaded, kind, recipe, desc


def data_config(req: Request, recipe: Recipe | None) -> tuple[DataConfig, bool]:
    """(the DataConfig to build examples with, whether to take the run's validation split)."""
    if req.data is None:
        if recipe is None:
            raise ConfigError(f"{req.source} is not a run folder, so it has no data of its own; pass --data FILE.")
        if recipe.data.val_fraction <= 0:
            raise ConfigError(f"the run {req.source} has no validation split (data.val_fraction is 0); "
                              "pass --data FILE to evaluate it on a data set.")
        cfg = recipe.data
        if req.all_tokens:
            cfg = replace(cfg, train_on_prompt=True)
        if req.max_length:
            cfg = replace(cfg, max_length=req.max_length)
        return replace(cfg, packing=False), True
    from ..data.pydoc_text import resolve

    path = resolve(req.data)
    fmt = req.format or (recipe.data.format if recipe is not None else "text")
    max_length = req.max_length or (recipe.data.max_length if recipe is not None else 1024)
    system = recipe.data.system_prompt if recipe is not None else None
    return DataConfig(path=str(path), format=fmt, max_length=max_length, train_on_prompt=req.all_tokens,
                      packing=False, val_fraction=0.0, system_prompt=system), False


def examples_for(cfg: DataConfig, tokenizer, val_split: bool, seed: int, max_examples: int | None):
    """(examples in file order, data stats). A run's validation split is the one `data.build` draws for training."""
    if val_split:
        ds = data.build(cfg, tokenizer, seed)
        examples, stats = ds.val, ds.stats
    else:
        examples = data.examples(cfg, tokenizer)  # every record, in file order, tokenized and masked as training
        stats = examples.tok.stats
    n = len(examples) if max_examples is None else min(max_examples, len(examples))
    if n == 0:
        raise DataError(f"{cfg.path}: no example is left to evaluate (records {stats.get('records')}, dropped "
                        f"{stats.get('dropped')}: nothing to score within --max-length).")
    return examples[:n], stats


@torch.no_grad()
def mean_loss(model: torch.nn.Module, examples: list[data.Example], pad_id: int, batch_size: int,
              device: str | torch.device = "cpu", progress: bool = False, chunk: int = 256) -> tuple[float, int]:
    """(mean loss per label token, label tokens): train.evaluate's computation, summed in float64."""
    from tqdm.auto import tqdm

    model.eval()
    loss_fn = CausalLMLoss(model, chunk)
    total, count = 0.0, 0
    starts = range(0, len(examples), batch_size)
    for i in tqdm(starts, disable=not progress, desc="eval", unit="batch", dynamic_ncols=True, leave=False):
        batch = {k: v.to(device) for k, v in data.collate(examples[i : i + batch_size], pad_id).items()}
        loss, n = loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1), count


def run(req: Request, progress: bool = False) -> Result:
    if req.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1.")
    if req.data is not None:  # a bad data file fails before the model loads
        from ..data.pydoc_text import resolve

        fmt = req.format or (_run_format(req.source) if kind_of(req.source) == "run" else "text")
        data.check(DataConfig(path=str(resolve(req.data)), format=fmt))
    loaded, kind, recipe, qdesc = load(req)
    cfg, val_split = data_config(req, recipe)
    seed = recipe.train.seed if recipe is not None else 0  # the seed training split the data with
    if cfg.format == "preference":
        return _preference(req, loaded, kind, recipe, qdesc, cfg, val_split, seed, progress)
    examples, stats = examples_for(cfg, loaded.tokenizer, val_split, seed, req.max_examples)
    if req.fast and kind != "gguf":
        from .inference import densify

        densify(loaded.model, exact=True)
    t0 = time.perf_counter()
    loss, n = mean_loss(loaded.model, examples, data.pad_token_id(loaded.tokenizer), req.batch_size, req.device,
                        progress, recipe.train.loss_chunk if recipe is not None else 256)
    return Result(source=req.source, kind=kind, data=cfg.path + (" (validation split)" if val_split else ""),
                  format=cfg.format, masked=not (cfg.train_on_prompt or cfg.format == "text"), examples=len(examples),
                  tokens=n, loss=loss, perplexity=math.exp(min(loss, 700.0)), quant=qdesc,
                  seconds=round(time.perf_counter() - t0, 3),
                  stats={k: stats[k] for k in ("records", "truncated", "dropped") if k in stats})


def _preference(req: Request, loaded, kind: Kind, recipe: Recipe | None, qdesc: str, cfg: DataConfig,
                val_split: bool, seed: int, progress: bool) -> Result:
    """Preference data: the objective's mean loss per pair (kto: per answer), reward accuracy and margin, with the
    reference being the same loaded model with every adapter off (a model without adapters: rewards are 0). The
    frozen base stays as loaded (no densify): training's reference is this quantized base."""
    from ..config import TrainConfig
    from ..train import preference

    base = recipe.train if recipe is not None and recipe.train.objective != "sft" else TrainConfig(objective="dpo")
    t = replace(base, objective=req.objective or base.objective, beta=req.beta or base.beta)
    if t.objective == "sft":
        raise ConfigError("--objective sft on preference data: choose dpo, ipo, orpo, kto or simpo.")
    if cfg.train_on_prompt:  # prompt tokens would count in both answers' log-probs
        raise ConfigError("--all-tokens does not apply to preference data: rewards compare the answers only. Drop it.")
    ds = data.build(replace(cfg, val_fraction=recipe.data.val_fraction if val_split else 0.0), loaded.tokenizer, seed,
                    paired=t.objective != "kto")
    units = ds.val if val_split else ds.train
    n = len(units) if req.max_examples is None else min(req.max_examples, len(units))
    if n == 0:
        raise DataError(f"{cfg.path}: no preference pair is left to evaluate within --max-length.")
    units = data.Units(units.tok, units.groups[:n])
    t0 = time.perf_counter()
    loss_fn = preference.PreferenceLoss(loaded.model, t)
    out = preference.evaluate(loss_fn, units, req.batch_size, data.pad_token_id(loaded.tokenizer), req.device)
    loss = out.pop("loss")
    return Result(source=req.source, kind=kind, data=cfg.path + (" (validation split)" if val_split else ""),
                  format=cfg.format, masked=True, examples=n, tokens=units.label_tokens(), loss=loss,
                  perplexity=float("nan"), quant=qdesc, seconds=round(time.perf_counter() - t0, 3),
                  stats={k: ds.stats[k] for k in ("records", "truncated", "dropped") if k in ds.stats},
                  preference={"objective": t.objective, "beta": t.beta, **{k: round(v, 6) for k, v in out.items()}})


def _run_format(source: str) -> str:
    from ..config import load_recipe

    return load_recipe(Path(source).expanduser() / "recipe.yaml").data.format
