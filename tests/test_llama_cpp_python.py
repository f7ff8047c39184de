"""The other K-quant route: llama-cpp-python's binding of llama.cpp's own `llama_model_quantize`, run on an f16 GGUF
we write (gguf_export._kquantize; taken when the xllamacpp wheel is absent). Skipped unless llama-cpp-python is
installed: it compiles llama.cpp from source (~30 minutes on 2 cores), so `make test` never installs it.

Reference, not ours: llama.cpp's quantizer decides every tensor's block type itself, so the file it writes checks
the per-tensor type mix that gguf_kquant restates for the ggml route; the gguf package's dequantizer reads its blocks
back within the type's error of the f16 file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_tiny_model, tiny_recipe
from qlora_kit.export import formats as ex
from qlora_kit.export.gguf import kquant as gguf_kquant

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (it compiles llama.cpp from source)")
gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("kind, bound", [("q4_k_m", 0.1), ("q6_k", 0.025)])
def test_llama_cpp_python_quantizes_with_llama_cpps_own_type_mix(tiny_data, tmp_path, monkeypatch, kind, bound):
    from qlora_kit.train import loop as train

    model = make_tiny_model(tmp_path / "model", hidden=256, intermediate=352)  # 352: ffn_down rows not 256-blocks
    run = tmp_path / "run"
    train.run(tiny_recipe(model, tiny_data, quant={"compute_dtype": "fp32"}, train={"steps": 1}), run, progress=False)
    ex.export(run, ex.Options("gguf", tmp_path / "f16.gguf", gguf_type="f16", progress=False))
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type)
           for t in gguf.GGUFReader(tmp_path / "f16.gguf").tensors}

    monkeypatch.setattr(gguf_kquant, "available", lambda: False)  # as without the xllamacpp wheel
    out = tmp_path / f"{kind}.gguf"
    ex.export(run, ex.Options("gguf", out, gguf_type=kind, progress=False))
    files = ["model", "run", "f16.gguf", "f16.Modelfile", f"{kind}.gguf", f"{kind}.Modelfile"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # the route's temporary f16 file is gone

    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].contents() == gguf_kquant.KQUANTS[kind].file_type
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    for t in r.tensors:
        if len(t.shape) == 1:
            want = "F32"
        else:  # GGUF shapes are (columns, rows)
            want = gguf_kquant.row_fallback(gguf_kquant.tensor_kind(kind, t.name, n_layers, False), int(t.shape[0]))
        assert t.tensor_type.name == want.upper(), (kind, t.name)
        W, R = gguf.quants.dequantize(t.data, t.tensor_type), ref[t.name]
        assert np.linalg.norm(W - R) <= bound * np.linalg.norm(R), (kind, t.name)
