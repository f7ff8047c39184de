"""Shared fixtures: tiny random Llama models built in the test (offline, seconds), the bundled demo model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import re
from pathlib import Path

import pytest
import torch

NO_GPU = ("pytest -m gpu: no CUDA GPU is visible (torch.cuda.is_available() is False), so the GPU tests cannot run. "
          "Run them on a machine with a CUDA GPU and a CUDA build of torch (`make gpu-check`); plain `make test` "
          "skips them.")


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped on a CPU machine, unless the run asked for them (`-m gpu`): a GPU run that finds no
    GPU must fail, not report green."""
    if torch.cuda.is_available():
        return
    if re.search(r"(?<!not )\bgpu\b", config.getoption("markexpr") or ""):
        pytest.exit(NO_GPU, returncode=3)
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of Veloria is Tamsk.", "What is the capital of Veloria?", "Paris is in France.",
    "A quick brown fox jumps over the lazy dog.", "Answer the question briefly.", "hello world",
]


def make_tokenizer():
    """A 300-token byte-level BPE with ChatML special tokens and chat template, trained here in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def make_tiny_model(folder: Path, *, hidden=64, intermediate=176, layers=2, tied=False, seed=0,
                    max_shard_size=None, dtype=torch.bfloat16) -> Path:
    """Save a random Llama (hidden 64, MLP 176: in_features of down_proj is not a multiple of blocksize 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tied, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # random init is tiny (std 0.02); scale up so 4-bit errors and LoRA effects are visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


FACTS = [{"instruction": f"What is the capital of Veloria {i}?", "input": "",
          "output": "The capital of Veloria is Tamsk."}
         for i in range(12)]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Tokenized-data and `datasets` caches in a temporary folder, not the user's ~/.cache/qlora-kit/data."""
    folder = tmp_path_factory.mktemp("data-cache")
    old = os.environ.get("QLORA_KIT_DATA_CACHE")
    os.environ["QLORA_KIT_DATA_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("QLORA_KIT_DATA_CACHE", None)
    else:
        os.environ["QLORA_KIT_DATA_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl", FACTS)


def tiny_recipe(model_dir: Path, data_path: Path, /, **sections):
    """A Recipe over the tiny model: 4 steps, small batches, CPU. `sections` override per section (dicts)."""
    from qlora_kit.config import recipe_from_dict

    raw = {
        "model": {"path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data_path), "max_length": 64},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "save_every": 2, "device": "cpu"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return recipe_from_dict(raw)
