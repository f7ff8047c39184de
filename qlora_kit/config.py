"""Typed, frozen recipe sections; `load_recipe(path, overrides)` with validation.

A recipe is YAML with the sections model, quant, lora, data, train, output (docs/ARCHITECTURE.md, "Recipes and run
folders"). Keys equal the dataclass field names below; `--set section.key=value` uses the same dotted paths. Unknown
keys fail and name the nearest valid key; wrong types and out-of-range values fail with the field and the allowed
range.

This module imports no torch (it must stay cheap for the CLI and for `estimate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError
from .terms import QuantType
from . import safe_yaml
from .ranges import LIMITS, RANGES
from .typecheck import coerce, shown

ComputeDtype = Literal["bf16", "fp32"]
DataFormat = Literal["text", "alpaca", "chat", "sharegpt", "completion", "preference"]
Objective = Literal["sft", "dpo", "ipo", "orpo", "kto", "simpo"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"]


@dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2-135m"
    """A Hugging Face model folder (config.json + safetensors), a Hub id (`org/name`, or `org/name@revision` to pin a
    branch, tag or commit: fetched into the Hugging Face cache once) or a built-in name (`smollm2-135m`)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """dtype of the unquantized frozen weights (embeddings, norms, lm_head) and so of the residual stream. `auto`:
    bf16 wherever the device has it (every CPU; CUDA GPUs from Ampere), else fp16 with dynamic loss scaling (as
    `fp16` always gets). Never up-cast to fp32 unless asked."""
    allow_pickle: bool = False
    """Allow `.bin` (pickle) checkpoints; they are then read with `torch.load(weights_only=True)`."""
    trust_remote_code: bool = False
    """Run model code shipped inside the folder. Off unless you trust the folder."""


@dataclass(frozen=True)
class QuantConfig:
    type: QuantType = "nf4"
    """nf4 | fp4 (4-bit blockwise) | int8 (row-wise absmax) | none (plain 16-bit base)."""
    double_quant: bool = True
    """Quantize the 4-bit absmax constants again (8-bit, blocks of 256): ~0.37 fewer bits per weight (QLoRA 3.2)."""
    blocksize: int = 64
    """Weights per absmax constant for nf4/fp4: one of 32, 64, 128, 256, 512, 1024, 2048, 4096."""
    compute_dtype: ComputeDtype = "bf16"
    """dtype the quantized weight is dequantized to for the matmul, and the dtype of the adapters."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    """Adapter rank (LoRA paper: r as low as 1-4 often suffices)."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) * B @ A, or alpha / sqrt(r) with rslora."""
    dropout: float = 0.05
    """Dropout on the adapter's input, in [0, 1)."""
    targets: Union[str, list[str]] = "all-linear"
    """`all-linear` (every Linear but lm_head), a list of module-name suffixes ([q_proj, v_proj]), or a regex
    matched against full module names."""
    init: Literal["kaiming", "gaussian", "loftq"] = "kaiming"
    """Initialisation. kaiming / gaussian: of A, with B zero, so an untrained adapter changes nothing. loftq (LoftQ,
    arXiv 2310.08659): A and B from alternating quantization and truncated SVD, so that the quantized base plus
    the adapter approximates the 16-bit weights at step 0; needs a quantized base (quant.type not none)."""
    loftq_iters: int = 5
    """LoftQ alternations T (the paper uses 5; 1 quantizes W itself and fits the adapter to the error once)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r."""
    dora: bool = False
    """DoRA (Liu et al. 2024, arXiv 2402.09353): W' = m * (W + s B A) / ||W + s B A|| per output row, with a
    trainable magnitude m (out,) initialised to the base's row norms. The norm is a constant in backward."""
    plus_ratio: float = 1.0
    """LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B's learning rate = plus_ratio x A's (e.g. 16); 1 is plain
    LoRA."""


@dataclass(frozen=True)
class IA3Config:
    outputs: Union[str, list[str]] = field(default_factory=lambda: ["k_proj", "v_proj"])
    """Modules whose OUTPUT is scaled by a learned vector l (out,): y = l * (W x) (IA3, Liu et al. 2022, arXiv
    2205.05638). Module-name suffixes or a regex over full names, as lora.targets."""
    inputs: Union[str, list[str]] = field(default_factory=lambda: ["down_proj"])
    """Modules whose INPUT is scaled by l (in,): y = W (l * x) (PEFT's feedforward_modules)."""


@dataclass(frozen=True)
class DataConfig:
    path: str = "recipes/data/facts.jsonl"
    """A .jsonl/.json/.parquet/.csv/.arrow file, a folder written by `datasets`' save_to_disk, or a hub data set
    name (needs the network)."""
    format: DataFormat = "alpaca"
    """text: {"text"}; alpaca: {"instruction", "input"?, "output"}; chat: {"messages": [{"role", "content"}]};
    sharegpt: {"conversations": [{"from": human|gpt|system, "value"}]}; completion: {"prompt", "completion"};
    preference: {"prompt", "chosen", "rejected"} (kto also {"prompt", "completion", "label"}), data/preference.py."""
    columns: dict[str, str] = field(default_factory=dict)
    """Your column names for ours, {our field: your column}, e.g. {instruction: question, output: answer}."""
    split: str = "train"
    """The split to read from a save_to_disk DatasetDict, a folder of data files or a hub data set."""
    subset: str | None = None
    """The configuration (subset) of a hub data set that has several."""
    assistant_turns: Literal["all", "last"] = "all"
    """chat/sharegpt: take loss on every assistant turn, or only on the last one."""
    cache: bool = True
    """Tokenize once: keep the tokenized data under the cache dir, keyed by the data's content, the tokenizer and
    these data settings; a second run or a resume with the same data does not tokenize again."""
    max_length: int = 256
    """Tokens per example; longer examples are truncated."""
    train_on_prompt: bool = False
    """Also compute loss on prompt tokens (default: response tokens only)."""
    packing: bool = False
    """Concatenate whole examples into rows of <= max_length tokens (fewer pad tokens, same loss mask). Each example
    keeps its own positions (restarting at 0) and attends only to itself: the same per-token losses as unpacked."""
    val_fraction: float = 0.0
    """Fraction of examples held out for validation loss, in [0, 1)."""
    system_prompt: str | None = None
    """For alpaca/chat rendered with a chat template: a system message to put first (None: template default)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 60
    """Optimizer steps."""
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2.0e-4
    """Peak learning rate."""
    warmup_steps: int = 5
    """Linear warmup from 0 to lr."""
    schedule: Schedule = "cosine"
    """After warmup: cosine or linear decay to 0, or constant."""
    optimizer: Optimizer = "adamw"
    """adamw (torch, fp32 state) | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    seed: int = 0
    gradient_checkpointing: bool = True
    """Non-reentrant activation checkpointing of every decoder layer."""
    loss_chunk: int = 256
    """Label tokens per cross-entropy chunk: only one chunk's fp32 logits (and their gradients, ~12 bytes x chunk x
    vocab) live at a time. Smaller saves memory at a negligible cost in speed."""
    offload_activations: bool = False
    """Keep each checkpointed decoder-layer input in host memory (pinned, copied on a side stream on CUDA) between
    its forward and its recompute: device memory for them drops from layers x (B, S, H) to 2 x (B, S, H), host
    memory grows by layers x (B, S, H). Exact (the same gradients); costs two copies per layer per step. Needs
    gradient_checkpointing."""
    mlp_chunk: int = 0
    """> 0: run each decoder MLP over the sequence in chunks of this many tokens in training, so only one chunk's
    (B, chunk, intermediate) tensors are alive; 0: off. Costs one more MLP forward per step; same results up to
    float summation order (LoRA dropout masks are drawn per chunk)."""
    log_every: int = 1
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end, if there is a validation split)."""
    save_every: int = 20
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient: stop with a message, or skip that batch and count it."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when present, else CPU."""
    num_threads: int = 0
    """CPU threads for torch (0: torch's default)."""
    return_freed_memory: bool = False
    """Host RAM: have glibc give freed tensors over 128 KiB back to the OS instead of keeping them for reuse, so the
    process RSS follows the live tensors (demo model, seq 2048: RSS growth 1.8x the live-tensor peak instead of
    3.3x) at ~0.7x tokens/s on the CPU (host_memory.py). Linux with glibc; elsewhere it changes nothing."""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """Several processes (torchrun / accelerate launch): ddp replicates the frozen base on every rank; fsdp shards
    it (FSDP2, one decoder layer gathered at a time). auto: ddp when launched with more than one process. Adapters
    and optimizer state are replicated either way; in one process both are a plain run."""
    dist_timeout_s: int = 600
    """Seconds a rank waits for the others in a collective before it stops and names the ranks that went silent."""
    report_to: list[Tracker] = field(default_factory=list)
    """Also log metrics.jsonl's values to experiment trackers: [tensorboard, wandb, mlflow] (optional extras)."""
    objective: Objective = "sft"
    """sft, or a preference objective over data.format preference (train/objectives.py cites each paper)."""
    beta: float = 0.1
    """Preference strength: dpo/kto/simpo beta, ipo tau (target margin 1/(2 tau)), orpo lambda."""
    label_smoothing: float = 0.0
    """dpo only: the probability a pair's label is flipped (conservative DPO), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo only: the target reward margin gamma (TRL's CPOConfig.simpo_gamma)."""
    kto_desirable_weight: float = 1.0
    """kto only: lambda_D, the weight of desirable answers' losses."""
    kto_undesirable_weight: float = 1.0
    """kto only: lambda_U, the weight of undesirable answers' losses."""
    precompute_reference: bool = False
    """dpo/ipo: the reference log-probs computed once per example before step 1 and kept in the run folder
    (reference_logps.safetensors, read on resume) instead of a no-grad reference forward every step."""


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/demo"
    """The run folder: recipe.yaml, metrics.jsonl, checkpoints/, adapter/."""


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ia3: IA3Config | None = None
    """Absent (null): no IA3. `ia3: {}` turns it on with the default targets."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> "Recipe":
        return dataclasses.replace(self, **sections)


def parse_targets(text: str) -> str | list[str]:
    """A command line's targets -> LoraConfig.targets: `all-linear`, or a comma list of module names (q_proj,v_proj)."""
    if text.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--targets {text!r} names no module; use all-linear or a comma list like q_proj,v_proj")
    return names


# Names people bring from PEFT / transformers TrainingArguments / other tools: difflib cannot guess `rank` -> `r`.
_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length",
    "max_seq_len": "max_length", "seq_len": "max_length", "optim": "optimizer", "lr_scheduler_type": "schedule",
    "warmup": "warmup_steps", "save_steps": "save_every", "logging_steps": "log_every", "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints", "model_name_or_path": "path", "output_dir": "dir", "bits": "type",
}

SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Recipe)}  # type: ignore[misc]
_SECTION_TYPES = {k: next((a for a in typing.get_args(t) if a is not type(None)), t)  # Optional[X] -> X
                  for k, t in typing.get_type_hints(Recipe).items()}
OPTIONAL_SECTIONS = ("ia3",)  # absent or null: the method is off (None); a mapping, even {}, turns it on


def _nearest(name: str, choices: typing.Iterable[str]) -> str:
    choices = list(choices)
    if _ALIASES.get(name) in choices:
        return f" Did you mean '{_ALIASES[name]}'?"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _build_section(name: str, raw: Any) -> Any:
    cls = _SECTION_TYPES[name]
    if raw is None:
        if name in OPTIONAL_SECTIONS:
            return None
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe section '{name}' must be a mapping of keys to values, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(
                f"unknown key '{name}.{str(key)[:40]}'.{_nearest(str(key)[:100], hints)} "
                f"Valid keys in '{name}': {', '.join(hints)}."
            )
        kwargs[key] = coerce(value, hints[key], f"{name}.{key}")
        check = RANGES.get((name, key))
        if check and not check[0](kwargs[key]):
            raise ConfigError(f"{name}.{key} = {shown(kwargs[key])} is out of range: it must be {check[1]}.")
        limit = LIMITS.get((name, key))
        if limit is not None and kwargs[key] > limit:
            raise ConfigError(f"{name}.{key} = {shown(kwargs[key])} is beyond what any machine runs: at most {limit}.")
    for key in ("targets", "outputs", "inputs"):
        value = kwargs.get(key)
        if isinstance(value, str) and value != "all-linear":
            try:  # a string other than all-linear is a regex: fail here, not after loading the model
                re.compile(value)
            except re.error as e:
                raise ConfigError(f"{name}.{key} {shown(value)} is not a valid regular expression ({e}); use "
                                  "all-linear, a list of module names like [q_proj, v_proj], "
                                  "or a valid regex.") from None
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is parsed as YAML (`3`, `true`, `[q_proj]`)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {shown(text)}: expected section.key=value, for example --set train.steps=10.")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = safe_yaml.load(raw, f"--set {shown(text)}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section.strip(), key.strip(), value


def recipe_from_dict(raw: Any, overrides: typing.Sequence[str] = ()) -> Recipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a YAML mapping with sections {', '.join(SECTIONS)}; "
                          f"got {type(raw).__name__}.")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"--set {shown(text)}: unknown section {shown(section, 40)}."
                              f"{_nearest(section[:100], SECTIONS)}")
        if raw.get(section) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"recipe section '{section}' must be a mapping.")
        raw[section][key] = value
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(
                f"unknown recipe section {shown(name, 40)}.{_nearest(str(name)[:100], SECTIONS)} "
                f"Sections: {', '.join(SECTIONS)}."
            )
    recipe = Recipe(**{name: _build_section(name, raw.get(name)) for name in SECTIONS})
    if recipe.lora.dora and recipe.lora.init == "loftq":
        raise ConfigError("lora.dora with lora.init loftq: LoftQ's A and B cancel the quantization error of W, which "
                          "DoRA's magnitude would then rescale; choose one (lora.init kaiming for DoRA).")
    _check_objective(recipe)
    if recipe.ia3 is None and recipe.lora.targets == []:
        raise ConfigError("lora.targets is [] and there is no ia3 section: nothing would train. Set lora.targets "
                          "(e.g. all-linear), or add an `ia3:` section (ia3: {} uses k_proj/v_proj and down_proj).")
    return recipe


REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")  # the losses that compare with the reference policy


def _check_objective(recipe: Recipe) -> None:
    """The objective and the data shape agree; a loss's own knob is not set for another loss."""
    t, d, pref = recipe.train, recipe.data, recipe.train.objective != "sft"
    own = {"label_smoothing": "dpo", "simpo_gamma": "simpo", "kto_desirable_weight": "kto",
           "kto_undesirable_weight": "kto"}
    rules = [(not pref and d.format == "preference", "data.format is preference but train.objective is sft, which "
              "ignores the rejected answers; set train.objective to dpo, ipo, orpo, kto or simpo."),
             (pref and d.format != "preference", f"train.objective {t.objective} learns from preference records; set "
              "data.format to preference ({prompt, chosen, rejected})."),
             (pref and (d.packing or d.train_on_prompt), "data.packing and data.train_on_prompt do not apply to a "
              "preference objective (one answer per row, loss on the answers only); set them to false."),
             *((getattr(t, k) != getattr(TrainConfig, k) and t.objective != o, f"train.{k} only changes {o}'s loss "
                f"and train.objective is {t.objective}; remove it, or set train.objective to {o}.")
               for k, o in own.items()),
             (t.precompute_reference and t.objective not in ("dpo", "ipo"), "train.precompute_reference works with "
              f"train.objective dpo or ipo; {t.objective} has no reference or (kto) pairs each prompt with another "
              "row's answer for its KL estimate, so its reference runs in the step. Remove it.")]
    for bad, message in rules:
        if bad:
            raise ConfigError(message)


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (with `yaml.safe_load`), apply `section.key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}. Pass a YAML file, e.g. recipes/demo.yaml.")
    if path.stat().st_size > safe_yaml.MAX_BYTES:
        raise ConfigError(f"recipe {path} is {path.stat().st_size} bytes; a recipe is at most {safe_yaml.MAX_BYTES} "
                          "(a few dozen keys). Did you pass a data file?")
    try:
        raw = safe_yaml.load(path.read_text(encoding="utf-8"), f"recipe {path}")
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {getattr(e, 'problem', e)}.") from None
    return recipe_from_dict(raw, overrides)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
