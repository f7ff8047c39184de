"""Hugging Face Hub ids as model names, offline: a Hub cache laid out here (models--org--name/snapshots/<commit>,
refs/<branch>) exactly as huggingface_hub writes it, HF_HUB_CACHE pointing at it, nothing downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model

REV_A, REV_B = "a" * 40, "b" * 40


def _snapshot(cache: Path, repo: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> Path:
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snap / f.name)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, tiny_model, monkeypatch):
    """org/tiny: main -> A (the tiny model), tag v2 -> B (another seed's weights)."""
    cache = tmp_path / "hub"
    other = make_tiny_model(tmp_path / "other", seed=1)
    _snapshot(cache, "org/tiny", REV_A, tiny_model, ("main",))
    _snapshot(cache, "org/tiny", REV_B, other, ("v2",))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub at call time
    return cache


def _cli(*args, cache: Path, cwd: Path):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_parse_hub_ids():
    from qlora_kit.model.hub import parse

    assert parse("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert parse("org/name@v1.0") == ("org/name", "v1.0")
    for not_an_id in ("./models/x", "~/x", "/abs/x", "a/b/c", "org/name@", "smollm2-135m", "../x"):
        assert parse(not_an_id) is None, not_an_id


def test_resolve_follows_refs_and_pins_revisions(hub_cache):
    from qlora_kit.model.load import resolve

    snaps = hub_cache / "models--org--tiny" / "snapshots"
    assert resolve("org/tiny") == snaps / REV_A  # refs/main
    assert resolve("org/tiny@main") == snaps / REV_A
    assert resolve("org/tiny@v2") == snaps / REV_B  # a tag
    assert resolve(f"org/tiny@{REV_B}") == snaps / REV_B  # a commit


def test_load_base_from_a_hub_id_is_the_same_model(hub_cache, tiny_model):
    """The Hub id loads the snapshot's weights: logits equal those of the folder it was copied from, and the pinned
    revision B (other weights) differs."""
    from qlora_kit.config import ModelConfig, QuantConfig
    from qlora_kit.model.load import load_base

    x = torch.tensor([[1, 5, 9, 42, 7]])
    q = QuantConfig(type="none")
    logits = {}
    for name in (str(tiny_model), "org/tiny", "org/tiny@v2"):
        model, tok, _ = load_base(ModelConfig(path=name), q)
        logits[name] = model(x).logits.float()
    assert torch.equal(logits[str(tiny_model)], logits["org/tiny"])
    assert not torch.allclose(logits["org/tiny"], logits["org/tiny@v2"])


def test_missing_hub_id_offline_says_what_to_do(tmp_path, hub_cache):
    r = _cli("inspect", "org/absent", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "not in the Hugging Face cache" in r.stderr and "hf download org/absent" in r.stderr
    assert "HF_HUB_OFFLINE" in r.stderr and "Traceback" not in r.stderr
    r = _cli("inspect", "org/tiny@v9", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 2 and "--revision v9" in r.stderr, r.stderr


def test_cli_inspect_and_estimate_take_hub_ids(tmp_path, hub_cache, tiny_model):
    r = _cli("inspect", "org/tiny", "--json", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layers"] == 2
    # estimate reads config.json alone: a cache holding nothing else for the repo is enough
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(tiny_model / "config.json", only_config / "config.json")
    _snapshot(hub_cache, "org/configonly", REV_A, only_config, ("main",))
    r = _cli("estimate", "--model", "org/configonly", "--json", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    local = _cli("estimate", "--model", str(tiny_model), "--json", cache=hub_cache, cwd=tmp_path)
    assert json.loads(r.stdout)["total"] == json.loads(local.stdout)["total"]
    r = _cli("estimate", "--model", "org/nothing", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 2 and "hf download org/nothing" in r.stderr, r.stderr


def test_a_local_folder_named_like_a_hub_id_wins(tmp_path, hub_cache, tiny_model, monkeypatch):
    from qlora_kit.model.load import resolve

    local = tmp_path / "org" / "tiny"
    shutil.copytree(tiny_model, local)
    monkeypatch.chdir(tmp_path)
    assert resolve("org/tiny") == Path("org/tiny")


def test_generate_and_export_take_hub_ids(hub_cache, tiny_model, tmp_path, capsys):
    """An adapter naming its base by Hub id exports exactly as over the local folder; generate answers a Hub id."""
    from safetensors.torch import load_file

    from qlora_kit.adapters import peft_format
    from qlora_kit.cli.main import main

    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.self_attn.q_proj.lora_{n}.weight": torch.randn(*s, generator=g) * 0.1
               for i in range(2) for n, s in (("A", (4, 64)), ("B", (64, 4)))}
    for base in ("org/tiny", str(tiny_model)):
        adapter = peft_format.save_adapter(tmp_path / f"a-{len(base)}", tensors, r=4, alpha=8.0, dropout=0.0,
                                           rslora=False, base_model=base)
        assert main(["export", str(adapter), "--format", "merged", "--out", str(tmp_path / f"m-{len(base)}"),
                     "--no-progress"]) == 0, capsys.readouterr().err
    hub_out = load_file(tmp_path / "m-8" / "model.safetensors")
    local_out = load_file(tmp_path / f"m-{len(str(tiny_model))}" / "model.safetensors")
    assert hub_out.keys() == local_out.keys() and all(torch.equal(hub_out[k], local_out[k]) for k in hub_out)
    assert main(["generate", "org/tiny@v2", "--prompt", "hello", "--quant", "none", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0, capsys.readouterr().err


def test_a_mistyped_run_folder_is_said_to_be_missing(hub_cache, tmp_path, monkeypatch):
    """`runs/demo2` reads like a Hub id; the message says first that no such folder is here, and what is."""
    from huggingface_hub import constants

    from qlora_kit.errors import ModelError
    from qlora_kit.model.load import resolve

    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"no folder runs/demo2 here \(runs/ holds: demo\)\. Read as a Hugging Face"):
        resolve("runs/demo2")
