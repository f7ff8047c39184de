"""gpt-oss's released RoPE run by llama.cpp itself (the xllamacpp wheel; skipped without the `llama-cpp` extra).
Every released gpt-oss config.json sets YaRN with truncate: false, which llama.cpp cannot follow (its correction
range is rounded to whole dimensions; export/gguf/rope.py): the GGUF is written as llama.cpp's converter writes it,
and this measures what that costs against transformers on a tiny gpt-oss with the released RoPE parameters."""

from __future__ import annotations

import pytest
import torch

from gguf_models import adapter, build, peft_merged

xlc = pytest.importorskip("xllamacpp", reason="llama.cpp runtime not installed: pip install 'qlora-kit[llama-cpp]'")
from test_gguf_bigmoe import YARN_RELEASED  # noqa: E402
from test_llama_cpp import STEPS, hf_greedy, llama_greedy, server  # noqa: E402  (after the skip: imports xllamacpp)
from test_llama_cpp_archs import banned_of, export  # noqa: E402

LENGTHS = (4, 9, 40, 100)  # prompt tokens; STEPS more are generated


def test_released_yarn_rope_in_llama_cpp(tmp_path):
    """The same tiny gpt-oss (head_dim 64, released YaRN: theta 150000, factor 32, original context 4096) with a
    random LoRA, as an f32 GGUF, on random prompts of 4 to 100 tokens. With truncate: true, llama.cpp's greedy tokens
    and log-probabilities are transformers' (measured 2.3e-5 at most: the rounded ramp is what llama.cpp computes).
    With truncate: false (as released) the greedy tokens still agree and the log-probabilities stay within 0.1
    (measured 1.2e-2 to 3.3e-2; 4.6e-2 and 0.17 on other prompts of 100 and 200 tokens, and past 500 tokens the
    greedy tokens part: the angles drift apart with position), far from the rounding-only case."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in LENGTHS]
    err = {}
    for truncate in (True, False):
        rope = {**YARN_RELEASED, "truncate": truncate}
        base = build("gptoss", tmp_path / f"base-{truncate}", config={"head_dim": 64, "rope_parameters": rope,
                                                                      "max_position_embeddings": 131072})
        a = adapter("gptoss", tmp_path / f"a-{truncate}", base)
        export(a, tmp_path / f"m-{truncate}.gguf", gguf_type="f32")
        banned, model = banned_of(base), peft_merged(base, a)
        srv = server(tmp_path / f"m-{truncate}.gguf", n_ctx=max(LENGTHS) + STEPS + 8)
        for prompt in prompts:
            ours, lps = llama_greedy(srv, prompt, banned)
            theirs, logps = hf_greedy(model, prompt, banned)
            assert ours == theirs, (truncate, len(prompt))
            gap = max(abs(v - float(lp[i])) for lp, step in zip(logps, lps) for i, v in step.items())
            err[truncate, len(prompt)] = gap
            print(f"truncate {truncate}, {len(prompt)}-token prompt: max |log p| difference {gap:.2e}")
    exact, released = (max(v for (t, _), v in err.items() if t == k) for k in (True, False))
    assert exact < 1e-4 and released < 0.1 and released > 100 * exact, err
