"""Read back a GGUF model qlora-kit writes, as a transformers model: `eval` and `generate` on a .gguf file.

    config      read_config.config_of: the metadata back to config.json (the family's own keys inverted)
    names       each GGUF tensor's Hugging Face checkpoint name: the `gguf` package's name map (the one `arch`
                writes with) inverted, the candidate kept that transformers' own key rules (model.convert) route
                into the model built from that config; MoE expert stacks (E, out, in) split back into one
                ...experts.<e>.<name> weight per expert (arch.group_experts' layout)
    values      every tensor dequantized by the `gguf` package (gguf.quants.dequantize) to fp32, then the writer's
                layout changes undone by the writer's own rules (arch.TensorNames: the q/k and fused-qkv row reorders
                inverted, Conv1D weights transposed back, Gemma's norm weights minus 1), then converted by
                transformers' rules (per-expert weights fused into its 3-D expert tensors) and cast to the asked dtype,
                or to fp32 where transformers' class keeps a tensor so (DeepSeek-V3's router and its bias)
    splits      a tensor the writer wrote as pieces (families_moe: gpt-oss's interleaved gate_up, its transposed
                down and their biases, the sinks; DeepSeek's kv_b_proj as attn_k_b / attn_v_b, V3's router bias) is
                put back together by the writer's own rule (arch.TensorNames.pieces asked of every tensor of the
                model built from the config): each piece's `take` applied to the source's element indices says
                where its values came from; a split that does not cover the source exactly once is refused
    RoPE        longrope's factor tensors are config values; llama3's rope_freqs divide the built model's inv_freq
    tokenizer   transformers' own GGUF tokenizer builder (vocabulary, merges or scores, token types, special ids,
                chat template), its split regex set from `vocab.PRE_TOKENIZERS` for the pre-tokenizer names qlora-kit
                writes

A file this reader cannot map (another architecture, an adapter GGUF, a tensor with no Hugging Face name, a weight
the model would miss) is refused by name, never loaded partly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...errors import ModelError
from . import arch as gguf_arch, read_config
from .vocab import PRE_TOKENIZERS

EXPS = "_exps"  # llama.cpp's stacked-expert tensor names: ffn_gate_exps, ffn_up_exps, ffn_down_exps


def metadata(reader) -> dict[str, Any]:
    """Every scalar and string key (arrays other than the tokenizer's are not needed here)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "scores", "token_type")):
            continue
        try:
            out[key] = f.contents()
        except Exception:  # noqa: BLE001  a field type gguf-py cannot render is not one we read
            continue
    return out


def _inverse_names(names: gguf_arch.TensorNames) -> dict[str, list[str]]:
    """GGUF base name (blk.0.attn_q) -> the Hugging Face names (without .weight/.bias) that write it."""
    out: dict[str, list[str]] = {}
    for hf, (_, gname) in names.map.mapping.items():
        out.setdefault(gname, []).append(hf)
    return out


def hf_names(gname: str, shape: tuple[int, ...], inverse: dict, names: gguf_arch.TensorNames,
             conversion) -> list[str]:
    """The checkpoint name(s) of one GGUF tensor: one, or one per expert for a stacked expert tensor."""
    base, _, suffix = gname.rpartition(".")
    for cand in inverse.get(base, ()):
        if base.endswith(EXPS):  # ...experts.w1 -> ...experts.<e>.w1.weight (arch.EXPERT's layout)
            head, _, tail = cand.rpartition(".experts.")
            if not tail:
                continue
            out = [f"{head}.experts.{e}.{tail}.{suffix}" for e in range(shape[0])]
        else:
            out = [f"{cand}.{suffix}"]
        if conversion.route(out[0])[0] in conversion.names:
            return out
    raise ModelError(f"GGUF tensor {gname} has no name in this {names.arch.hf}; the file was not written by "
                     "qlora-kit's exporter for this architecture (or by a llama.cpp converter it reads).")


def undo(W: torch.Tensor, hf: str, names: gguf_arch.TensorNames) -> torch.Tensor:
    """The writer's layout changes (writer._tensor) undone on one fp32 tensor, found by the writer's own rules
    (arch.TensorNames): the row reorder inverted (its permutation read off row indices), the norm shift taken off,
    a Conv1D weight transposed back to (in, out)."""
    rows = names.rows(hf)
    if rows is not None:  # W_gguf = W_hf[perm] for the perm the reorder makes of 0..out-1
        perm = rows(torch.arange(W.shape[0], dtype=torch.float64).unsqueeze(1))[:, 0].long()
        W = W[torch.argsort(perm)]
    shift = names.shift(hf)
    if shift:
        W = W - shift
    if W.dim() == 2 and names.transposed(hf):
        W = W.t().contiguous()
    return W


def _value(t) -> torch.Tensor:
    import gguf

    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def open_file(path: Path):
    try:
        import gguf
    except ImportError as e:
        raise ModelError(f"reading GGUF needs the gguf package ({e}); pip install gguf.") from None
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}. Pass a .gguf file, a model folder, a run folder or a "
                         "built-in name.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ModelError(f"{path} is not a readable GGUF file ({e}).") from None


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(transformers model in eval mode on `device`, tokenizer) of a GGUF model file."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ...model.convert import Conversion

    path = Path(path).expanduser()
    r = open_file(path)
    meta = metadata(r)
    if meta.get("general.type", "model") != "model":
        raise ModelError(f"{path} is a GGUF {meta.get('general.type')} (a LoRA adapter for llama.cpp's --lora), not a "
                         "model: evaluate the merged GGUF (export --format gguf) or the run itself.")
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}
    values = {t.name: t for t in r.tensors}
    longrope = {f"{k}_factor": _value(values[f"rope_factors_{k}.weight"]).tolist() for k in ("long", "short")
                if f"rope_factors_{k}.weight" in values}
    config, fam, rope_freqs = read_config.config_of(meta, shapes, longrope)
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):  # params on meta; buffers (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = gguf_arch.TensorNames(gguf_arch.arch_of(config.to_dict()))
    inverse = _inverse_names(names)
    conversion = Conversion(model)
    sources = split_sources(model, names)
    pieces: dict[str, dict[str, tuple]] = {}  # split source -> {GGUF name: (take, read)}
    extra = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
    groups: dict[str, list] = {}  # one decoder block at a time: its experts fuse once the block is read
    for t in r.tensors:
        block = groups.setdefault(".".join(t.name.split(".")[:2]), [])
        if t.name in sources:
            hf, shape, take, want = sources[t.name]
            if shapes[t.name] != want:
                raise ModelError(f"{path}: {t.name} is {shapes[t.name]}, not the {want} this {fam.gguf.lower()} "
                                 f"model's {hf} {shape} is written as; the file is not this model's.")
            if hf not in pieces:  # read once every piece is: after this loop, when the block converts
                block.append((hf, lambda hf=hf, shape=shape: undo(join(shape, pieces[hf].values()), hf, names)))
            pieces.setdefault(hf, {})[t.name] = (take, lambda t=t: _value(t))
        elif t.name not in extra:
            block.extend(_items(t, hf_names(t.name, shapes[t.name], inverse, names, conversion), names))
    for hf, got in pieces.items():
        lack = sorted(g for g, s in sources.items() if s[0] == hf and g not in got)
        if lack:
            raise ModelError(f"{path} has {', '.join(got)} but not {', '.join(lack)}: {hf} cannot be put back "
                             "together. Export it again.")
    params = dict(model.named_parameters())
    targets = params | dict(model.named_buffers())  # DeepSeek-V3's router bias is a buffer
    state = {}  # cast as each tensor comes: fp32 copies never pile up (the file itself is memory-mapped)
    while groups:  # popped, so a block's fp32 values (held by its readers) go with it
        items = groups.pop(next(iter(groups)))
        state |= {k: v.to(targets[k].dtype) for k, v in conversion.convert(model, items) if k in targets}
    missing = [n for n in params if n not in state and not _tied(model, n)]
    if missing:
        raise ModelError(f"{path} lacks weights this {fam.gguf.lower()} model needs ({', '.join(missing[:3])}...); it "
                         "was not written whole. Export it again.")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if rope_freqs is not None:
        _divide_inv_freq(model, _value(values[rope_freqs]))
    return model.to(device).eval(), tokenizer(path, meta)


def split_sources(model, names: gguf_arch.TensorNames) -> dict[str, tuple]:
    """GGUF name -> (source name, source shape, take, piece shape) of every piece the writer's split makes of the
    tensors of `model` (built from the file's config; params on meta, buffers real: names and shapes only)."""
    split, out = names.arch.fam.split, {}
    if split is None:
        return out
    for hf, t in model.state_dict(keep_vars=True).items():
        shape = tuple(t.shape)
        if split(hf, shape, names.arch.config) is None:
            continue
        if names.rows(hf) is not None:  # a row reorder after the split: not inverted here
            raise ModelError(f"the GGUF reader cannot put {hf} of a {names.arch.hf} back together (its pieces are "
                             "also reordered). Evaluate the model folder it came from.")
        out |= {g: (hf, shape, take, piece) for g, piece, take in names.pieces(hf, shape)}
    return out


def join(shape: tuple[int, ...], pieces) -> torch.Tensor:
    """The fp32 source tensor of `shape` that the writer cut into `pieces` ((take or None, read()) each): take
    applied to the source's element indices 0..n-1 gives, in the piece's element order, where each value came from
    (as `undo` reads a row order off row indices). Per leading slice when every take keeps the leading dimension
    (gpt-oss's (E, hidden, 2I) expert stacks: one expert's indices, not all of them)."""
    pieces = [(take or (lambda x: x), read) for take, read in pieces]
    per = len(shape) == 3 and all(_slicewise(take, shape) for take, _ in pieces)
    rows, sub = (shape[0], shape[1:]) if per else (1, shape)
    n = math.prod(sub)
    idx = torch.arange(n).reshape((1, *sub) if per else sub)
    out, seen, count = torch.empty(rows, n), torch.zeros(n, dtype=torch.bool), 0
    for take, read in pieces:
        where = take(idx).reshape(-1)
        out[:, where] = read().float().reshape(rows, -1)
        seen[where] = True
        count += where.numel()
    if count != n or not bool(seen.all()):
        raise ModelError(f"the GGUF reader cannot put a {shape} tensor back together from pieces that do not cover "
                         "it exactly once (the writer's split changed). Evaluate the model folder it came from.")
    return out.reshape(shape)


def _slicewise(take: Callable, shape: tuple[int, ...]) -> bool:
    """take maps slice e of the leading dimension to slice e of its output (checked on two slices' indices)."""
    m = math.prod(shape[1:])
    try:
        w = take(torch.arange(2 * m).reshape(2, *shape[1:]))
    except (RuntimeError, IndexError, ValueError):
        return False
    return w.shape[0] == 2 and bool((w[0] < m).all()) and torch.equal(w[1], w[0] + m)


def _items(t, hfs: list[str], names) -> list:
    """(checkpoint name, read) for one GGUF tensor; the value is read (dequantized) when the conversion asks, an
    expert stack once for all its experts."""
    if len(hfs) == 1:
        return [(hfs[0], lambda: undo(_value(t), hfs[0], names))]
    cache: dict[str, torch.Tensor] = {}

    def whole() -> torch.Tensor:
        if "v" not in cache:
            cache["v"] = _value(t)
        return cache["v"]
    return [(hf, lambda e=e, hf=hf: undo(whole()[e], hf, names)) for e, hf in enumerate(hfs)]


def _tied(model, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _divide_inv_freq(model, factors: torch.Tensor) -> None:
    """llama3 RoPE: llama.cpp divides each frequency by rope_freqs; the built (default-RoPE) model's inv_freq
    likewise, on every rotary module."""
    hit = False
    for m in model.modules():
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and m.inv_freq.shape == factors.shape:
            m.inv_freq = m.inv_freq / factors.to(m.inv_freq)
            if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
                m.original_inv_freq = m.inv_freq.clone()
            hit = True
    if not hit:
        raise ModelError("this GGUF's rope_freqs tensor fits no rotary embedding of the model built from it.")


def tokenizer(path: Path, meta: dict):
    """transformers' tokenizer of the file (its GGUF builder), a byte-level BPE's pre-tokenizer set from
    vocab.PRE_TOKENIZERS (the table the writer names it by), pad set to eos when the file names none."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    pre = meta.get("tokenizer.ggml.pre")
    bpe = meta.get("tokenizer.ggml.model") == "gpt2"
    if bpe and pre not in PRE_TOKENIZERS:
        raise ModelError(f"{path}: its byte-level BPE tokenizer splits text as llama.cpp's {pre!r} pre-tokenizer, "
                         f"which qlora-kit's GGUF reader does not rebuild (known: {', '.join(PRE_TOKENIZERS)}); the "
                         "tokens would differ. Evaluate the model folder it came from.")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    if bpe:
        spec = json.loads(tok.backend_tokenizer.to_str()) | {"pre_tokenizer": PRE_TOKENIZERS[pre]}
        tok.backend_tokenizer.pre_tokenizer = Tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    elif meta.get("tokenizer.ggml.model") == "llama":
        _dummy_prefix(tok, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _dummy_prefix(tok, prefix: bool) -> None:
    """SentencePiece: transformers' builder picks the dummy-prefix space by architecture (Gemma: none); the file's
    add_space_prefix (the writer read it off the model's own encoding of "a") wins where they disagree, as
    transformers' Llama tokenizer applies it: a Metaspace that prepends at the start unless a space is there."""
    from tokenizers import decoders, pre_tokenizers

    if tok.convert_ids_to_tokens(tok("a", add_special_tokens=False).input_ids)[0].startswith("\u2581") == prefix:
        return
    b = tok.backend_tokenizer
    b.normalizer = None
    b.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                               split=False)
    b.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                  + ([decoders.Strip(" ", 1, 0)] if prefix else []))
