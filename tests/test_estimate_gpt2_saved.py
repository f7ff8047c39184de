"""GPT-2's own dropout (attn_pdrop, resid_pdrop, embd_pdrop, on while training) as qlora-kit trains it (prepare():
Conv1D layers quantized and adapted as Linears, LoRA on all of them): saved-tensor hooks count every storage autograd
keeps while the last decoder layer runs, against layer_activations. With attention dropout SDPA has no fused CPU
kernel and takes its math path: fp32 q, k, v, softmax output, mask and dropped (B, nh, S, S) probabilities, and the
output projection reads a copy; each residual dropout saves its (B, S, H) mask. Without dropout the fused kernel
saves q, k, v (views of c_attn's (T, 3H) output), the output and the logsumexp."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import transformers

from conftest import make_tokenizer
from saved_layer import last_layer_saved


@pytest.mark.parametrize("drop", [0.1, 0.0])
def test_gpt2_layer_saved_tensors_with_its_own_dropout(drop, tmp_path):
    tok = make_tokenizer()
    config = transformers.GPT2Config(n_embd=64, n_inner=192, n_layer=2, n_head=4, vocab_size=len(tok),
                                     n_positions=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, attn_pdrop=drop, resid_pdrop=drop,
                                     embd_pdrop=drop)
    torch.manual_seed(0)
    folder = tmp_path / "m"
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    B, S = (2, 40) if drop else (3, 24)  # neither a power of two
    p, saved, terms = last_layer_saved(folder, B, S, dropout=0.05)
    assert p.model.training and p.model.config.attn_pdrop == drop
    assert ("attn_weights" in terms and "resid_dropout" in terms) == bool(drop)
    assert sum(terms.values()) == saved, (saved, terms)
