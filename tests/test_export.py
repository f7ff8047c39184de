"""qlora-kit export: PEFT adapter, merged (exact against the training-time model), requantized; streaming memory;
atomic output and clear errors. Tiny random Llamas built here; each test takes seconds on a CPU."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_model, tiny_recipe
from qlora_kit.export import files as export_files, formats as ex
from qlora_kit.export import shards
from qlora_kit.adapters import lora, peft_format
from qlora_kit.quant import bnb as quant
from qlora_kit.cli.main import main
from qlora_kit.errors import ExportError

IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3, 8, 120, 64, 2]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextmanager
def no_warnings(allow: str | None = None):
    """Fail on any Python warning or transformers/peft log record at WARNING or above (but those containing
    `allow`)."""
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, loggers = Grab(logging.WARNING), [logging.getLogger(n) for n in ("transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for lg in loggers:
        lg.removeHandler(handler)
    messages = records + [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    messages = [m for m in messages if not (allow and allow in m)]
    assert not messages, messages


def hf_model(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def training_time_model(run: Path, as_trained: bool = False):
    """What training computed: the quantized base + LoRA from the run's recipe, the adapter loaded, in fp32
    (`as_trained`: the frozen weights kept in the run's frozen dtype, as training held them)."""
    from qlora_kit.config import load_recipe
    from qlora_kit.model.load import load_base
    from qlora_kit.train.prepare import lora_spec

    recipe = load_recipe(run / "recipe.yaml")
    model, _, _ = load_base(recipe.model, recipe.quant)
    lora.inject(model, recipe.lora.targets, lora_spec(recipe))
    lora.load_adapter_state(model, peft_format.load_adapter(run / "adapter").tensors)
    if as_trained:
        return model.eval()
    return model.float().eval()  # bf16 embeddings/norms -> fp32 exactly; QuantLinear dequantizes to fp32 (compute)


def random_adapter(folder: Path, base: Path, modules: list[str], shapes: dict[str, tuple[int, int]], r=4, alpha=8.0,
                   seed=0, dtype=torch.float32) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        out_f, in_f = shapes[m]
        tensors[f"{m}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) * 0.1).to(dtype)
        tensors[f"{m}.lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.1).to(dtype)
    return peft_format.save_adapter(folder, tensors, r=r, alpha=alpha, dropout=0.0, rslora=False, base_model=str(base))


def linear_shapes(base: Path) -> dict[str, tuple[int, int]]:
    return {n[: -len(".weight")]: i.shape for n, i in shards.tensor_index(base).items()
            if n.endswith("_proj.weight")}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    return {n: shards.read_tensor(i) for n, i in shards.tensor_index(folder).items()}


def export(src, out, **kw) -> ex.Result:
    return ex.export(src, ex.Options(out=out, progress=False, **{"format": "merged", **kw}))


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tiny_data, tmp_path_factory) -> Path:
    """4 steps of QLoRA (nf4, double quant, blocksize 64, r 4) with fp32 compute on the tiny model (MLP 176)."""
    from qlora_kit.train import loop as train

    run = tmp_path_factory.mktemp("qlora") / "run"
    train.run(tiny_recipe(tiny_model, tiny_data, quant={"compute_dtype": "fp32"}), run, progress=False)
    return run


@pytest.fixture(scope="module")
def merged_fp32(qlora_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("m32") / "merged"
    export(qlora_run, out, dtype="fp32")
    return out


# ---- pure pieces --------------------------------------------------------------------------------------------------


def test_max_shard_size_and_shard_plan():
    assert shards.max_shard_bytes("2GB") == 2 * 10**9 and shards.max_shard_bytes("1.5GiB") == 3 << 29
    for bad in ("", "2XB", "-1GB", "0MB", "GB", "12", "512B"):  # the size table itself: tests/test_terms.py
        with pytest.raises(ExportError, match="max-shard-size"):
            shards.max_shard_bytes(bad)
    assert shards.plan_shards([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]  # too big -> a shard of its own
    assert shards.shard_names(1) == ["model.safetensors"]
    assert shards.shard_names(2)[1] == "model-00002-of-00002.safetensors"
    lay = shards.layout([shards.Entry("b", torch.uint8, (3,)), shards.Entry("a", torch.float32, (2,))])
    assert lay == {"a": (0, 8), "b": (8, 11)}  # widest dtype first: every tensor aligned


@pytest.mark.parametrize("pending_max", [1, 1 << 20], ids=["each-write-waits", "writes-behind"])
def test_shard_writer_roundtrip(tmp_path, monkeypatch, pending_max):
    monkeypatch.setattr(shards, "PENDING_MAX", pending_max)
    t = {"w": torch.randn(7, 5).to(torch.bfloat16), "s": torch.arange(3, dtype=torch.uint8), "f": torch.randn(4)}
    w = shards.ShardWriter(tmp_path / "x.safetensors", [shards.Entry(k, v.dtype, tuple(v.shape)) for k, v in t.items()],
                           ["blob"])
    w.write("w", t["w"][4:], row_start=4)  # rows in any order
    w.write("w", t["w"][:4])
    w.write("f", t["f"])
    w.write("s", t["s"])
    w.write_tail("blob", torch.tensor(list(b'{"a": 1}'), dtype=torch.uint8))
    w.close()
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in t.items():
            assert torch.equal(f.get_tensor(k), v)
        assert bytes(f.get_tensor("blob").numpy()) == b'{"a": 1}'
    assert torch.equal(shards.read_tensor(shards.tensor_index(tmp_path)["w"], (2, 5)), t["w"][2:5])


def test_module_scaling_follows_peft_patterns():
    A = torch.zeros(2, 8)
    a = peft_format.Adapter({"m.layers.0.q_proj.lora_A.weight": A, "m.layers.0.q_proj.lora_B.weight": A.T,
                             "m.layers.0.v_proj.lora_A.weight": A, "m.layers.0.v_proj.lora_B.weight": A.T},
                            r=4, alpha=8, rslora=False, target_modules=[], base_model=None,
                            config={"alpha_pattern": {"v_proj": 16}})
    assert a.module_scaling("m.layers.0.q_proj") == 4.0  # r from A's shape (rank_pattern), alpha 8
    assert a.module_scaling("m.layers.0.v_proj") == 8.0


# ---- formats ------------------------------------------------------------------------------------------------------


def test_adapter_format_loads_in_peft_with_same_logits(tiny_model, tiny_data, tmp_path):
    """A run on a plain (quant none) base: PEFT loads our export with no missing/unexpected keys, same logits."""
    from peft import PeftModel

    from qlora_kit.train import loop as train

    run = tmp_path / "run"
    train.run(tiny_recipe(tiny_model, tiny_data, quant={"type": "none", "compute_dtype": "fp32"}), run, progress=False)
    out = tmp_path / "adapter"
    export(run, out, format="adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == sorted(cfg["target_modules"]) and "down_proj" in cfg["target_modules"]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in keys and len(keys) == 2 * 14
    base = hf_model(tiny_model)
    with no_warnings(allow="is deprecated"):  # peft 0.21 calls a transformers 5 deprecated alias; not about keys
        peft_model = PeftModel.from_pretrained(base, out).eval()
    assert rel(logits(peft_model), logits(training_time_model(run))) < 1e-4


def test_merged_fp32_equals_training_time_model(qlora_run, merged_fp32):
    """nf4 base, down_proj in_features 176 (not a multiple of 64): merged logits == training-time logits."""
    with no_warnings():
        merged = hf_model(merged_fp32)
    files = sorted(p.name for p in merged_fp32.iterdir())
    assert files == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((merged_fp32 / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    ref = logits(training_time_model(qlora_run))
    assert rel(logits(merged), ref) < 1e-4


def test_merged_bf16_is_the_fp32_merge_rounded_once(qlora_run, merged_fp32, tiny_model, tmp_path):
    """bf16 export = fp32 merge cast to bf16 once (bit for bit). Its logits are within bf16 rounding of the
    training-time model. Tolerance: bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); with bf16 weights
    AND activations through 2 layers that compounds to ~2e-2 on this model, which is exactly what running the same
    model (the base, no adapter) in bf16 instead of fp32 costs. We allow 1.5x that measured bf16 cost."""
    out = tmp_path / "m16"
    export(qlora_run, out)  # default dtype bf16
    w16, w32 = read_all(out), read_all(merged_fp32)
    assert w16.keys() == w32.keys()
    assert all(torch.equal(w16[k], w32[k].to(torch.bfloat16)) for k in w16)
    ref = logits(training_time_model(qlora_run))
    err = rel(logits(hf_model(out, torch.bfloat16)), ref)
    base = hf_model(tiny_model)
    bf16_cost = rel(logits(base.to(torch.bfloat16)), logits(hf_model(tiny_model)))
    assert err < 1.5 * bf16_cost, (err, bf16_cost)


def test_merge_base_original_vs_dequantized(qlora_run, merged_fp32, tiny_model, tmp_path):
    out = tmp_path / "orig"
    export(qlora_run, out, dtype="fp32", merge_base="original")
    orig, deq, src = read_all(out), read_all(merged_fp32), read_all(tiny_model)
    adapter = peft_format.load_adapter(qlora_run / "adapter")
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        A, B = adapter.pair(m)
        W = src[f"{m}.weight"]
        expected = W.float() + (B.float() @ A.float()) * adapter.scaling
        assert torch.allclose(orig[f"{m}.weight"], expected, rtol=0, atol=1e-6)
        Wq = quant.roundtrip(W, quant.QuantSpec(compute_dtype=torch.float32), torch.float32)
        assert torch.allclose(deq[f"{m}.weight"], Wq + (B.float() @ A.float()) * adapter.scaling, rtol=0, atol=1e-6)
        assert rel(orig[f"{m}.weight"], deq[f"{m}.weight"]) > 0.02  # the 4-bit error: they really differ
    assert torch.equal(orig["model.embed_tokens.weight"], deq["model.embed_tokens.weight"])


def test_zero_adapter_merged_onto_original_is_the_base_bit_for_bit(tiny_model, tmp_path):
    shapes = linear_shapes(tiny_model)
    adapter = random_adapter(tmp_path / "a", tiny_model, sorted(shapes), shapes)
    tensors = peft_format.load_adapter(adapter).tensors
    peft_format.save_adapter(adapter, {k: v * 0 if ".lora_B." in k else v for k, v in tensors.items()}, r=4, alpha=8,
                             dropout=0.0, rslora=False, base_model=str(tiny_model))
    export(adapter, tmp_path / "m", merge_base="original")
    merged, src = read_all(tmp_path / "m"), read_all(tiny_model)
    assert merged.keys() == src.keys() and all(torch.equal(merged[k], src[k]) for k in src)


def test_peft_trained_adapter_merged_equals_peft_forward(tiny_model, tmp_path):
    """An adapter written by `peft` itself (with rank_pattern / alpha_pattern), merged onto the same weights."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}, task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model(tiny_model), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "peft"), "--base", str(tiny_model), "--format", "merged",
                 "--merge-base", "original", "--dtype", "fp32", "--out", str(out), "--no-progress"]) == 0
    ref = logits(peft_model.eval())
    with peft_model.disable_adapter():
        assert rel(ref, logits(peft_model)) > 1e-2  # the adapter matters
    assert rel(logits(hf_model(out)), ref) < 1e-4
    export(tmp_path / "peft", tmp_path / "again", format="adapter")  # re-exported: patterns kept, PEFT reloads it
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == {"down_proj": 2} and again["alpha_pattern"] == {"v_proj": 16}
    with no_warnings(allow="is deprecated"):
        reloaded = PeftModel.from_pretrained(hf_model(tiny_model), tmp_path / "again").eval()
    assert rel(logits(reloaded), ref) < 1e-5


def test_sharded_merge_streams_in_bounded_memory(tmp_path):
    """A 37 MB model in 8 MB shards: the output is sharded with an index and loads; peak RSS growth during the
    merge (VmHWM reset via /proc/self/clear_refs, in a fresh process) stays under 2x the largest source shard.
    (Loading the model would cost 37 MB; what we hold is the adapter, ~1 MB, plus one weight's transients.)"""
    base = make_tiny_model(tmp_path / "big", hidden=256, intermediate=512, layers=32, max_shard_size="8MB")
    src_files = shards.weight_files(base)
    largest = max(p.stat().st_size for p in src_files)
    assert len(src_files) >= 3
    shapes = linear_shapes(base)
    random_adapter(tmp_path / "adapter", base, sorted(shapes), shapes, dtype=torch.bfloat16)
    warm = make_tiny_model(tmp_path / "warm")
    random_adapter(tmp_path / "warm_adapter", warm, sorted(linear_shapes(warm)), linear_shapes(warm))
    script = textwrap.dedent(f"""
        import json, sys
        from qlora_kit.export import formats as ex
        def status(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
        # warm-up: lazy imports, thread pools and allocator arenas are not the merge's memory
        ex.export({str(tmp_path / "warm_adapter")!r}, """
        f"""ex.Options("merged", {str(tmp_path / "warm_out")!r}, progress=False))
        before = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        ex.export({str(tmp_path / "adapter")!r}, ex.Options("merged", {str(tmp_path / "out")!r}, max_shard_size="8MB",
                  progress=False))
        print(json.dumps({{"before": before, "peak": status("VmHWM:")}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    if res.returncode != 0 and "clear_refs" in res.stderr:
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    print(f"peak RSS growth {growth / 1e6:.1f} MB; largest shard {largest / 1e6:.1f} MB")
    assert growth < 2 * largest, f"peak RSS grew {growth / 1e6:.1f} MB; largest shard {largest / 1e6:.1f} MB"
    out = tmp_path / "out"
    index = json.loads((out / shards.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4 and all((out / f).stat().st_size <= 8 * 10**6 for f in files)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in shards.tensor_index(out).values())
    with no_warnings():
        hf_model(out, torch.bfloat16)


def _quantized_setup(tmp_path, intermediate):
    base = make_tiny_model(tmp_path / "base", intermediate=intermediate)
    shapes = linear_shapes(base)
    return base, random_adapter(tmp_path / "adapter", base, sorted(shapes), shapes)


def test_quantized_loads_as_4bit_model(tmp_path):
    """nf4 export of an aligned model (MLP 128): transformers loads it 4-bit on the CPU; its logits equal the
    merged model with every Linear put through nf4 (bf16 compute level) and are 4-bit-close to the merged model."""
    import bitsandbytes as bnb

    base, adapter = _quantized_setup(tmp_path, 128)
    export(adapter, tmp_path / "q", format="quantized")
    export(adapter, tmp_path / "m", dtype="fp32")
    q = hf_model(tmp_path / "q", torch.bfloat16)  # dtype of the unquantized parts; the config says bfloat16 anyway
    linears = [n for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(q.get_submodule(n), bnb.nn.Linear4bit) for n in linears if n != "lm_head")
    assert not isinstance(q.lm_head, bnb.nn.Linear4bit)
    assert json.loads((tmp_path / "q" / "config.json").read_text()
                      )["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    merged = hf_model(tmp_path / "m")
    ref = logits(merged)
    with torch.no_grad():
        for n in linears:
            if n != "lm_head":
                w = merged.get_submodule(n).weight
                w.copy_(quant.roundtrip(w.to(torch.bfloat16), quant.QuantSpec(), torch.float32))
    out = logits(q)
    assert rel(out, logits(merged)) < 3e-2  # the exact check: nf4(merged), up to bf16 compute in bitsandbytes
    assert 0.05 < rel(out, ref) < 0.6  # 4-bit error level vs the merged model (random std-0.3 weights: ~0.37)


def test_quantized_serialisation_is_exact_for_unaligned_shapes(tmp_path):
    """MLP 176: the stored codes dequantize (pure torch) to nf4(merged bf16 weight) exactly; transformers loads the
    folder as 4-bit (bitsandbytes' CPU kernels cannot run such shapes: the export says so)."""
    import bitsandbytes as bnb

    base, adapter = _quantized_setup(tmp_path, 176)
    res = export(adapter, tmp_path / "q", format="quantized")
    assert any("multiple of blocksize" in n for n in res.notes)
    export(adapter, tmp_path / "m")
    stored, merged = read_all(tmp_path / "q"), read_all(tmp_path / "m")
    m = "model.layers.1.mlp.down_proj.weight"
    state = json.loads(bytes(stored[m + ".quant_state.bitsandbytes__nf4"].numpy()))
    buffers = {"qweight": stored[m], "code": stored[m + ".quant_map"], "absmax": stored[m + ".absmax"],
               "nested_absmax": stored[m + ".nested_absmax"], "nested_code": stored[m + ".nested_quant_map"],
               "offset": torch.tensor(state["nested_offset"])}
    assert state["shape"] == [64, 176] and state["blocksize"] == 64 and state["dtype"] == "bfloat16"
    spec = quant.QuantSpec()
    assert torch.equal(quant.dequantize(buffers, spec, (64, 176), torch.float32),
                       quant.roundtrip(merged[m], spec, torch.float32))
    assert torch.equal(stored["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    q = hf_model(tmp_path / "q", torch.bfloat16)
    assert isinstance(q.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)


def test_quantized_int8_from_an_int8_run(tmp_path):
    """An adapter folder trained on int8 (--quant int8): merged on the int8 round trip, stored as LLM.int8."""
    import bitsandbytes as bnb

    base, adapter = _quantized_setup(tmp_path, 128)
    export(adapter, tmp_path / "q", format="quantized", quant="int8")
    export(adapter, tmp_path / "m", quant="int8")
    q = hf_model(tmp_path / "q", torch.bfloat16)
    assert isinstance(q.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert rel(logits(q), logits(hf_model(tmp_path / "m"))) < 0.1


# ---- safety and the CLI ------------------------------------------------------------------------------------------


def cli(*args) -> int:
    return main(["export", *map(str, args), "--no-progress"])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_existing_out_is_refused_without_force(qlora_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(qlora_run, "--format", "merged", "--out", out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli(qlora_run, "--format", "merged", "--out", out, "--force") == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("problem", ["missing", "shape"])
def test_adapter_that_does_not_fit_is_refused_before_writing(tiny_model, tmp_path, capsys, problem):
    shapes = linear_shapes(tiny_model)
    mods = ["model.layers.0.self_attn.q_proj"]
    if problem == "missing":
        mods.append("model.layers.7.self_attn.q_proj")
        shapes[mods[-1]] = (64, 64)
    else:
        shapes[mods[0]] = (64, 32)
    adapter = random_adapter(tmp_path / "a", tiny_model, mods, shapes)
    assert cli(adapter, "--format", "merged", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "does not fit the base" in err and "Traceback" not in err
    assert ("layers.7.self_attn.q_proj" in err) if problem == "missing" else ("(64, 32)" in err)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_disk_full_up_front_and_mid_write(qlora_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(export_files, "free_bytes", lambda path: 1000)
    assert cli(qlora_run, "--format", "merged", "--out", out) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    calls = []

    def enospc(self, data, offset):  # on the writer's thread: raised to the caller by a later write or close
        calls.append(offset)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_pwrite(self, data, offset)

    real_pwrite = shards.ShardWriter._pwrite
    monkeypatch.setattr(shards.ShardWriter, "_pwrite", enospc)
    assert cli(qlora_run, "--format", "merged", "--out", out) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_export_leaves_nothing_and_keeps_old_output(qlora_run, tmp_path, monkeypatch, exc):
    def boom(*a, **k):
        raise exc("killed mid-write")

    monkeypatch.setattr(shards.ShardWriter, "write_tail", boom)
    monkeypatch.setattr(shards.ShardWriter, "close", boom)
    out = tmp_path / "out"
    with pytest.raises(exc):
        export(qlora_run, out)
    assert not out.exists() and leftovers(tmp_path) == []
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(exc):
        export(qlora_run, out, force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and leftovers(tmp_path) == []


def test_cli_errors_are_short(qlora_run, tiny_model, tmp_path, capsys):
    shapes = linear_shapes(tiny_model)
    orphan = random_adapter(tmp_path / "orphan", tmp_path / "gone", ["model.layers.0.self_attn.q_proj"], shapes)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text((qlora_run / "recipe.yaml").read_text())
    cases = [
        ([orphan, "--format", "merged", "--out", tmp_path / "o"], "--base"),
        ([unfinished, "--format", "merged", "--out", tmp_path / "o"], "has no adapter/ yet"),
        ([qlora_run, "--format", "merged", "--out", tmp_path / "o", "--max-shard-size", "2XB"], "max-shard-size"),
        ([tmp_path, "--format", "merged", "--out", tmp_path / "o"], "neither a run folder"),
        ([qlora_run, "--format", "merged", "--out", tiny_model, "--force", "--base", tiny_model],
         "overwrite the input"),
        ([qlora_run, "--format", "merged", "--out", tmp_path / "o", "--quant", "fp4"], "trained with quant.type nf4"),
        ([qlora_run, "--format", "zip", "--out", tmp_path / "o"], "zip"),
    ] + ([] if torch.cuda.is_available() else
         [([qlora_run, "--format", "merged", "--out", tmp_path / "o", "--device", "cuda"], "no CUDA GPU")])
    for args, message in cases:
        assert cli(*args) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 4, err
    assert not (tmp_path / "o").exists()
    # 4 steps keep ~2% of the adapter's change through re-quantization: refused unless --allow-lossy
    assert cli(qlora_run, "--format", "quantized", "--out", tmp_path / "q", "--allow-lossy") == 0
    captured = capsys.readouterr()
    assert "wrote quantized export" in captured.out and "multiple of blocksize" in captured.err


def test_unadapted_quantized_needs_no_model_when_every_linear_is_adapted(qlora_run, tiny_model, monkeypatch):
    """The default all-linear adapter: no Linear is left unadapted, decided from the weight names alone (building
    the model on the meta device costs ~2 s of imports); a partial target set still goes through the model."""
    import dataclasses

    from qlora_kit.export.files import linear_weights
    from qlora_kit.export.shards import tensor_index

    src, index = ex.open_source(qlora_run), tensor_index(tiny_model)
    linear = linear_weights(tiny_model)
    assert linear & set(index) - src.weight_names() == set()  # the fixture adapts every Linear

    def no_model(base):
        raise AssertionError("built the model")

    monkeypatch.setattr(ex, "linear_weights", no_model)
    assert ex.unadapted_quantized(src, tiny_model, index, "dequantized") == set()
    monkeypatch.setattr(ex, "linear_weights", linear_weights)
    some = {m for m in src.modules() if m.endswith("q_proj")}

    class OnlyQ(type(src)):  # as if only q_proj were adapted
        def modules(self):
            return some

    got = ex.unadapted_quantized(OnlyQ(**{f.name: getattr(src, f.name) for f in dataclasses.fields(src)}),
                                 tiny_model, index, "dequantized")
    assert got == linear - {f"{m}.weight" for m in some} and "lm_head.weight" not in got and got
