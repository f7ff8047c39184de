"""What the benchmark scripts share: a random bf16 Llama written shard by shard from a config, so a model of
several GB is never whole in memory (merge_bench.py, gpu_peers.py); the PEFT + bitsandbytes peers' training loop
(memory_peers.py, moe_peers.py) and resident bytes (peer_static_bytes), and run_json_child (one measured child
process, dpo_peers.py). RSS and machine facts come from qlora_kit.measure.breakdown (`rss_kib`, `machine_info`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from qlora_kit import atomic
from qlora_kit.terms import GiB


def save_tokenizer(folder: Path) -> None:
    """A 300-token byte-level BPE: a random-weight model needs a tokenizer only for its loaders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a random-weight benchmark model needs a tokenizer only for its loaders"] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def build_random_llama(folder: Path, config, shard_bytes: int = 1 << 30) -> Path:
    """A random bf16 Llama for `config` (a transformers LlamaConfig): build_random_model."""
    from transformers import LlamaForCausalLM

    return build_random_model(folder, config, LlamaForCausalLM, shard_bytes)


def hub_experts(names: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """transformers 5's fused expert parameters (experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I)) as
    the Hub checkpoints' per-expert Linears (experts.N.gate_proj.weight (I, H) ...), the layout save_pretrained
    writes and the exporters read."""
    out = []
    for name, shape in names:
        stem = name.rsplit(".", 1)[0]
        if name.endswith(".experts.gate_up_proj"):
            e, i2, h = shape
            out += [(f"{stem}.{k}.{p}.weight", (i2 // 2, h)) for k in range(e) for p in ("gate_proj", "up_proj")]
        elif name.endswith(".experts.down_proj"):
            e, h, i = shape
            out += [(f"{stem}.{k}.down_proj.weight", (h, i)) for k in range(e)]
        else:
            out.append((name, shape))
    return out


def build_random_model(folder: Path, config, model_cls, shard_bytes: int = 1 << 30) -> Path:
    """Random bf16 weights (std 0.02, norms 1) for `config` of `model_cls` (a transformers model class; mixtures of
    experts in the Hub's per-expert layout, hub_experts), generated one tensor at a time (on the GPU if there is one)
    and saved shard by shard with an index, config and tokenizer. Written to a temporary folder and renamed
    (qlora_kit.atomic): an interrupted build leaves no half model behind. An existing folder is reused."""
    import torch
    from safetensors.torch import save_file

    if (folder / "config.json").is_file():
        return folder
    with atomic.atomic_folder(folder) as tmp:
        with torch.device("meta"):
            names = hub_experts([(n, tuple(p.shape)) for n, p in model_cls(config).named_parameters()])
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=dev).manual_seed(0)
        shards, current, size, total = [], {}, 0, 0

        def flush():
            nonlocal current, size
            if current:
                name = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(current, str(tmp / name), metadata={"format": "pt"})
                shards.append((name, list(current)))
                current, size = {}, 0

        for i, (name, shape) in enumerate(names):
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, device=dev, generator=gen) * 0.02).to(torch.bfloat16).cpu()
            nbytes = t.numel() * 2
            if size + nbytes > shard_bytes:
                flush()
            current[name], size, total = t, size + nbytes, total + nbytes
            print(f"\rbuilding {folder.name}: {i + 1}/{len(names)} tensors, {total / GiB:.1f} GiB", end="",
                  file=sys.stderr, flush=True)
        flush()
        n = len(shards)
        weight_map = {}
        for j, (name, keys) in enumerate(shards, 1):
            final = f"model-{j:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / name, tmp / final)
            weight_map |= dict.fromkeys(keys, final)
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=1))
        config.architectures = [model_cls.__name__]  # what a real checkpoint names (the GGUF export reads it)
        config.save_pretrained(tmp)
        save_tokenizer(tmp)
    print(file=sys.stderr)
    return folder


def peer_static_bytes(model, optimizer) -> int:
    """Bytes of a transformers + PEFT + bitsandbytes model's tensors that live across steps: parameters, buffers,
    the 4-bit quant states (and their nested state), the optimizer's state; each storage once."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        for obj in (qs, getattr(qs, "state2", None)):
            tensors += [v for v in vars(obj).values() if isinstance(v, torch.Tensor)] if obj is not None else []
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def run_json_child(cmd: list[str], threads: int, timeout: float) -> dict:
    """Run one benchmark child (`cmd`) with OMP_NUM_THREADS=threads, passive OpenMP waiting, offline Hub; return the
    last JSON line it prints, with the 1-minute load average before and after."""
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    load, t0 = os.getloadavg()[0], time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd[1:4])} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - t0, 1), "loadavg_before": round(load, 2),
            "loadavg_after": round(os.getloadavg()[0], 2)}


def peer_loop(model, batch: dict):
    """The peers' training loop over a PEFT model (train mode, checkpointing already on), as users write it: loss,
    backward, clip 1.0, torch AdamW (lr 1e-4) over the trainable parameters. Returns (step, static): step() runs one
    step and returns its loss; static() is the bytes of parameters, 4-bit quant states, buffers and optimizer state,
    each storage counted once (bench/memory_peers.py, bench/moe_peers.py)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = {k: v.to(model.device) for k, v in batch.items()}

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def static() -> int:
        return peer_static_bytes(model, opt)

    return step, static
