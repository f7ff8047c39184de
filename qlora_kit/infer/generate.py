"""Load a model for inference (a base, a run, or an adapter over a base) and answer prompts.

The quantized base is loaded exactly as in training (same quant settings from the run's recipe.yaml), the
adapter(s) injected as in training (LoRALinear, DoRALinear, IA3Linear; methods.attach) and their tensors copied in:
what you ask is what was trained.

Several adapters (`load_many`) share ONE quantized base through multi_lora; `answer_routed` then answers a mixed
batch in one generate call, each row through its own adapter (or none), each prompt in its adapter's template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..data import pipeline as data
from ..adapters import loftq, methods, multi_lora, peft_format
from ..config import ModelConfig, QuantConfig, Recipe, load_recipe
from ..device import resolve_device
from ..errors import ConfigError, ModelError
from ..model.load import load_base
from ..quant.bnb import DTYPES
from ..run.folder import adapter_source, is_run_dir


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    data_format: str = "alpaca"
    system_prompt: str | None = None
    # load_many: per adapter name, the (data format, system prompt) its run trained with; the base rows use the above
    formats: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    tools: list[dict] | None = None  # --tools: function schemas the chat template renders (infer/chat.load_tools)


def _attach(model: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """Every adapter of `folder` (LoRA, DoRA, IA3, or a stack: peft_format.load_stack) on the base, each module
    with ITS rank and scale (PEFT's rank_pattern / alpha_pattern), tensors copied in (methods.attach)."""
    try:
        methods.attach(model, peft_format.load_stack(folder), dtype)
    except ValueError as e:
        raise ModelError(f"the adapter does not fit the base: {e}. It was trained on a different model; pass the "
                         "base it was trained on with --base.") from None


def _base_config(source: str, base: str | None, allow_pickle: bool,
                 trust_remote_code: bool) -> tuple[ModelConfig, Recipe | None]:
    """The base model to load for `source` (a run folder: its recipe's model; an adapter folder: its base_model;
    else a model folder or name), `base` overriding; and the run's recipe when `source` is a run. The CLI flags
    add to what a run's recipe already allows, never remove."""
    p = Path(source)
    if p.is_dir() and is_run_dir(p):
        recipe = load_recipe(p / "recipe.yaml")
        m = recipe.model
        return ModelConfig(base or m.path, m.dtype, m.allow_pickle or allow_pickle,
                           m.trust_remote_code or trust_remote_code), recipe
    if p.is_dir() and (p / peft_format.CONFIG_NAME).is_file():
        base = base or peft_format.load_adapter(p).base_model
        if not base:
            raise ModelError(f"{p}: the adapter does not name its base model; pass --base MODEL.")
        source = base
    return ModelConfig(base or source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code), None


def default_quant(path: str, recipe: Recipe | None) -> QuantConfig:
    """How `path` runs when no quantization is asked for: a run as trained (its recipe's quant); a PEFT adapter
    folder over an nf4 base (the QLoRA paper's settings, how such adapters are trained); a model folder or
    built-in name (a merged export too) as stored, unquantized."""
    if recipe is not None:
        return recipe.quant
    p = Path(path)
    return QuantConfig() if p.is_dir() and (p / peft_format.CONFIG_NAME).is_file() else QuantConfig(type="none")


def is_gguf(path: str) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def load_gguf(path: str, dtype: str, device: str, read: Callable | None) -> Loaded:
    """A GGUF file as a transformers model, every tensor dequantized to `dtype` (bf16 | fp16 | fp32), tokenizer from
    the file, prompts rendered as for a model folder. `read` is qlora-kit's GGUF reader
    (qlora_kit.export.gguf.reader.load), passed in by the caller (the CLI): infer/ and export/ are one layer, and
    neither imports the other."""
    if read is None:
        raise ModelError(f"{path}: reading a GGUF file needs qlora-kit's GGUF reader; pass "
                         "read_gguf=qlora_kit.export.gguf.reader.load (the `eval` and `generate` commands do).")
    model, tok = read(Path(path).expanduser(), DTYPES[dtype], str(resolve_device(device)))
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return Loaded(model, tok)


def load(path: str, base: str | None = None, quant: QuantConfig | None = None, device: str = "auto",
         allow_pickle: bool = False, trust_remote_code: bool = False, read_gguf: Callable | None = None) -> Loaded:
    """`path` is a run folder, a PEFT adapter folder (base from --base or its config), a model (folder/name) or a
    GGUF file (read by `read_gguf`, fp32; load_gguf). `quant` None: default_quant. device: auto (CUDA when present)
    | cpu | cuda. allow_pickle / trust_remote_code (the CLI flags) add to what a run's recipe already allows, never
    remove."""
    if is_gguf(path):
        if (quant is not None and quant.type != "none") or base is not None:
            raise ConfigError("--quant and --base apply to model folders, runs and adapters; a GGUF file runs as "
                              "its own quantization, dequantized. Drop them.")
        return load_gguf(path, "fp32", device, read_gguf)
    device = resolve_device(device)
    model_cfg, recipe = _base_config(path, base, allow_pickle, trust_remote_code)
    # a LoftQ run's base is quantized around its stored low-rank offsets (loftq.py), exactly as in training
    offsets = loftq.Initializer.from_run(Path(path)) if loftq.is_loftq_run(recipe) else None
    quant = quant or default_quant(path, recipe)
    model, tok, _ = load_base(model_cfg, quant, device, before_quantize=offsets)
    loaded = Loaded(model, tok, *((recipe.data.format, recipe.data.system_prompt) if recipe else ("alpaca", None)))
    p = Path(path)
    if recipe is not None:
        _attach(model, p / "adapter", DTYPES[recipe.quant.compute_dtype])
    elif p.is_dir() and (p / peft_format.CONFIG_NAME).is_file():
        _attach(model, p, DTYPES[quant.compute_dtype])  # adapters compute as the base does
    loaded.model.eval()
    loaded.model.config.use_cache = True
    loaded.model.generation_config.use_cache = True
    return loaded


def sampling(temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None) -> dict:
    """model.generate's decoding options. top_p / top_k only shape sampling: with temperature 0 (greedy, always the
    likeliest token) they would be silently ignored, so they are refused there."""
    if temperature <= 0 and (top_p is not None or top_k is not None):
        raise ConfigError("--top-p / --top-k choose among sampled tokens, but --temperature is 0 (greedy decoding "
                          "always takes the likeliest token, so they would do nothing); set --temperature, e.g. 0.7.")
    kwargs: dict = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    kwargs |= {k: v for k, v in (("top_p", top_p), ("top_k", top_k), ("repetition_penalty", repetition_penalty))
               if v is not None}
    return kwargs


def _streamer(tokenizer, on_text: Callable[[str], None]):
    """transformers' TextStreamer (words released whole, never half a UTF-8 character), writing to `on_text`."""
    from transformers import TextStreamer

    class Stream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_text(text)

    return Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def reply(loaded: Loaded, ids: list[int], max_new_tokens: int, options: dict,
          on_text: Callable[[str], None] | None = None) -> str:
    """The model's continuation of token ids `ids`, decoded without special tokens; streamed to `on_text` as it is
    generated when given."""
    tok, model = loaded.tokenizer, loaded.model
    x = torch.tensor([ids], device=next(model.parameters()).device)
    streamer = _streamer(tok, on_text) if on_text is not None else None
    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                       pad_token_id=data.pad_token_id(tok), streamer=streamer, **options)
    return tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip()


def answer(loaded: Loaded, prompts: list[str], max_new_tokens: int = 64, raw: bool = False,
           temperature: float = 0.0, on_text: Callable[[int, str], None] | None = None, **options) -> list[str]:
    """Greedy (or sampled) answers, one per prompt. Prompts are rendered as in training unless `raw`. `options`:
    top_p, top_k, repetition_penalty (sampling()); `on_text(i, text)` receives prompt i's answer as it streams."""
    kwargs = sampling(temperature, **options)
    outs = []
    for i, prompt in enumerate(prompts):  # one at a time: no padding questions, and CPU batches of 1 are fast enough
        stream = (lambda text, i=i: on_text(i, text)) if on_text is not None else None
        outs.append(reply(loaded, encode(loaded, prompt, None, raw), max_new_tokens, kwargs, stream))
    return outs


def speed_up(loaded: Loaded, merge: bool = True, dtype: str = "auto") -> str:
    """The CPU fast path for generation (inference.for_decoding); `merge` folds a single adapter into the weights
    (not when it must be switched off again, as for --compare-base); `dtype` the Linear weights' storage (auto:
    fp16 on an AVX-512 CPU, else fp32). Returns what was done, for the log."""
    from .inference import for_decoding

    return for_decoding(loaded.model, merge, dtype)


def load_many(source: str, adapters: Mapping[str, str], base: str | None = None, quant: QuantConfig | None = None,
              device: str = "auto", allow_pickle: bool = False, trust_remote_code: bool = False) -> Loaded:
    """One base, several named adapters beside it (multi_lora). `adapters`: name -> a run folder, RUN/adapter or a
    PEFT adapter folder. `source` supplies only the base: a model folder or name, a run folder (its recipe's model,
    quant and prompt template; its own adapter is loaded only if also named in `adapters`), or an adapter folder
    (its base_model). Quantization: `quant`, else the source run's, else the first adapter run's, else nf4."""

    device = resolve_device(device)
    found = {}
    for name, path in adapters.items():
        multi_lora.check_name(name)
        adapter_dir, recipe = adapter_source(path)
        if loftq.is_loftq_run(recipe):
            raise ModelError(f"--adapter {name}={path}: a LoftQ run (lora.init loftq) is trained over its own base, "
                             "quantized around offsets stored in the run, so it cannot share a base with other "
                             f"adapters; ask it alone: qlora-kit generate {path} --prompt ...")
        stack = peft_format.load_stack(adapter_dir)
        if len(stack) > 1 or stack[0].method != "lora":
            raise ModelError(f"--adapter {name}={path}: a {'+'.join(a.method for a in stack)} adapter; routing rows "
                             "between adapters supports plain LoRA only. Load it on its own: qlora-kit generate "
                             f"{path} --prompt ...")
        found[name] = (stack[0], recipe)
    model_cfg, recipe = _base_config(source, base, allow_pickle, trust_remote_code)
    run_quants = [r.quant for _, r in found.values() if r is not None]
    quant = quant or (recipe.quant if recipe is not None else run_quants[0] if run_quants else QuantConfig())
    model, tok, _ = load_base(model_cfg, quant, device)  # the base, loaded and quantized once
    dtype = DTYPES[quant.compute_dtype]
    loaded = Loaded(model, tok, *((recipe.data.format, recipe.data.system_prompt) if recipe else ("alpaca", None)))
    for name, (adapter, run_recipe) in found.items():
        pairs = {m: adapter.pair(m) for m in adapter.modules()}
        try:
            multi_lora.add_adapter(model, name, pairs, adapter.alpha, adapter.rslora, dtype)
        except ModelError as e:
            raise ModelError(f"--adapter {name}={adapters[name]}: {e}") from None
        loaded.formats[name] = ((run_recipe.data.format, run_recipe.data.system_prompt) if run_recipe
                                else ("alpaca", None))
    model.eval()
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return loaded


def encode(loaded: Loaded, prompt: str, adapter: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of `prompt` as the run of `adapter` (None: the base) rendered its training prompts."""
    if raw:
        ids = loaded.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:  # nothing to continue from: the model's first step would embed an empty (1, 0) batch
            raise ConfigError(f"--raw --prompt {prompt!r} is no token at all (this tokenizer adds no BOS); give "
                              "some text to continue, or drop --raw to use the training template.")
        return ids
    fmt, system = loaded.formats.get(adapter, (loaded.data_format, loaded.system_prompt))
    return data.encode_prompt(prompt, loaded.tokenizer, fmt, system, loaded.tools)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T) int64, padded on the LEFT: every row's last token is at T-1, so
    the tokens a batched generate appends line up across rows."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def answer_routed(loaded: Loaded, prompts: list[str], routes: Sequence[str | None], max_new_tokens: int = 64,
                  raw: bool = False, temperature: float = 0.0, **options) -> list[str]:
    """All prompts in ONE generate call: left-padded with an attention mask, row i through adapter routes[i]
    (None: the base alone). Greedy answers equal those of each adapter alone (tests/test_multi_adapter.py)."""
    tok, model = loaded.tokenizer, loaded.model
    pad = data.pad_token_id(tok)
    x, mask = left_pad([encode(loaded, p, r, raw) for p, r in zip(prompts, routes)], pad)
    device = next(model.parameters()).device
    kwargs = sampling(temperature, **options)
    with multi_lora.route(model, list(routes)):
        y = model.generate(x.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                           pad_token_id=pad, **kwargs)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    outs = []
    for row in y[:, x.shape[1]:].tolist():  # a finished row is filled with pad: cut at its first end-of-sequence
        stop = next((i for i, t in enumerate(row) if t in eos), len(row))
        outs.append(tok.decode(row[:stop], skip_special_tokens=True).strip())
    return outs
