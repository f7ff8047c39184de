"""`qlora-kit analyze` against hand-built adapters whose answers are known: exact spectra (orthonormal factors),
a rank-1 update in a rank-8 adapter, amplification against a base built from directions of known strength, subspace
similarity of an adapter with itself (1) and with an orthogonal one (0); then the command: JSON, table, PNGs, exit 2
on bad input, and a real tiny model on disk (plain and nf4 run folder, dequantized as in training)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qlora_kit.analysis import analyze as an
from qlora_kit.cli.main import main
from qlora_kit.adapters.peft_format import save_adapter

Q = "model.layers.0.self_attn.q_proj"
OUT, IN = 48, 40


def orth(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) float64 with orthonormal columns."""
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def factors(s: list[float], scale: float, seed: int = 0, U=None, V=None):
    """(A (r, in), B (out, r)) with scale * B @ A = U diag(s) V^T exactly (up to float32 storage)."""
    U = orth(OUT, len(s), seed) if U is None else U
    V = orth(IN, len(s), seed + 1) if V is None else V
    return V.T.float().contiguous(), (U * torch.tensor(s, dtype=torch.float64) / scale).float().contiguous()


def write_adapter(folder: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float) -> Path:
    tensors = {}
    for module, (A, B) in pairs.items():
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = A, B
    return save_adapter(folder, tensors, r=r, alpha=alpha, dropout=0.0, rslora=False, base_model=None)


def run(capsys, *args):
    rc = main(["analyze", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the math --------------------------------------------------------------------------------------------------


def test_known_spectrum_stable_rank_and_energy_ranks():
    A, B = factors([3, 2, 1, 0, 0, 0, 0, 0], scale=2.0)
    svd = an.delta_svd(A, B, 2.0)
    assert svd.s.tolist() == pytest.approx([3, 2, 1, 0, 0, 0, 0, 0], abs=1e-6)
    assert an.stable_rank(svd.s) == pytest.approx((9 + 4 + 1) / 9, rel=1e-6)
    assert an.energy_rank(svd.s, 0.90) == 2  # 13/14 = 0.929 >= 0.9 > 9/14
    assert an.energy_rank(svd.s, 0.99) == 3  # 13/14 < 0.99
    assert an.numerical_rank(svd.s) == 3


def test_lowrank_svd_matches_dense_svd():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(6, IN, generator=g), torch.randn(OUT, 6, generator=g)
    svd = an.delta_svd(A, B, 0.7)
    dense = 0.7 * B.double() @ A.double()
    torch.testing.assert_close(svd.s, torch.linalg.svdvals(dense)[:6])
    torch.testing.assert_close(svd.U @ torch.diag(svd.s) @ svd.V.T, dense)
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(svd.V.T @ svd.V, torch.eye(6, dtype=torch.float64))


def test_rank1_update_in_rank8_adapter():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(8, IN, generator=g)
    B = torch.zeros(OUT, 8)
    B[:, 0] = torch.randn(OUT, generator=g)  # only one column trained: dW = b a_0^T has rank 1
    s = an.delta_svd(A, B, 2.0).s
    assert float(s[0]) == pytest.approx(2.0 * float(B[:, 0].norm() * A[0].norm()), rel=1e-6)
    assert an.energy_rank(s, 0.99) == an.energy_rank(s, 0.90) == 1
    assert an.stable_rank(s) == pytest.approx(1.0, rel=1e-9)
    assert an.numerical_rank(s) == 1


def test_zero_update_is_defined():
    s = an.delta_svd(torch.randn(4, IN), torch.zeros(OUT, 4), 2.0).s
    assert (an.stable_rank(s), an.energy_rank(s, 0.9), an.numerical_rank(s)) == (0.0, 0, 0)


def base_weight(strengths: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = sum_i strengths[i] u_i v_i^T with orthonormal u (OUT, n), v (IN, n)."""
    U, V = orth(OUT, len(strengths), 10), orth(IN, len(strengths), 11)
    return U @ torch.diag(torch.tensor(strengths, dtype=torch.float64)) @ V.T, U, V


@pytest.mark.parametrize("direction,expected", [(3, 4.0 / 0.5), (0, 4.0 / 10.0)])
def test_amplification_of_a_known_direction(direction, expected):
    W, U, V = base_weight([10.0, 5.0, 2.0, 0.5])
    A, B = factors([4.0], scale=2.0, U=U[:, direction:direction + 1], V=V[:, direction:direction + 1])
    svd = an.delta_svd(A, B, 2.0)
    res = an.amplification(W, svd, seed=0)
    # U^T W V picks out the strength of exactly that direction: ||dW||_F / strength
    assert res["directions"] == 1
    assert res["projection_norm"] == pytest.approx(4.0 / expected, rel=1e-6)
    assert res["amplification"] == pytest.approx(expected, rel=1e-6)
    assert res["weight_norm"] == pytest.approx(math.sqrt(100 + 25 + 4 + 0.25), rel=1e-9)
    # the baseline: the same ratio for seeded Haar-random directions, recomputed here
    g = torch.Generator().manual_seed(0)
    Ur, Vr = an.random_orthonormal(OUT, 1, g), an.random_orthonormal(IN, 1, g)
    assert res["random_baseline"] == pytest.approx(4.0 / float((Ur.T @ W @ Vr).norm()), rel=1e-6)
    assert an.amplification(W, svd, seed=0) == res
    assert an.amplification(W, svd, seed=1)["random_baseline"] != res["random_baseline"]


def test_amplification_uses_two_directions():
    W, U, V = base_weight([10.0, 5.0, 2.0, 0.5])
    A, B = factors([3.0, 1.0], scale=1.0, U=U[:, 2:4], V=V[:, 2:4])
    res = an.amplification(W, an.delta_svd(A, B, 1.0))
    assert res["directions"] == 2
    assert res["amplification"] == pytest.approx(math.sqrt(10) / math.sqrt(4 + 0.25), rel=1e-6)


def test_subspace_similarity_self_orthogonal_and_partial():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(8, IN, generator=g, dtype=torch.float64)
    assert torch.allclose(an.subspace_similarity(A, A), torch.ones(8, 8, dtype=torch.float64), atol=1e-9)
    P = torch.eye(IN, dtype=torch.float64) - torch.linalg.pinv(A) @ A  # projector onto A's row space complement
    A_orth = torch.randn(4, IN, generator=g, dtype=torch.float64) @ P
    phi = an.subspace_similarity(A, A_orth)
    assert phi.shape == (8, 4) and phi.abs().max() < 1e-9
    e = torch.eye(IN, dtype=torch.float64)
    A1 = torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)) @ e[:4]  # right singular vectors e1..e4
    A2 = torch.diag(torch.tensor([4.0, 3], dtype=torch.float64)) @ e[[0, 4]]  # e1, e5
    phi = an.subspace_similarity(A1, A2)
    assert phi[0, 0] == pytest.approx(1.0) and phi[0, 1] == pytest.approx(1.0)  # e1 shared
    assert phi[1, 1] == pytest.approx(0.5) and phi[3, 1] == pytest.approx(0.5)  # 1 of 2 shared
    assert phi[3, 0] == pytest.approx(1.0)


# ---- the command -----------------------------------------------------------------------------------------------


def hand_built(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(adapter with s = [3, 2, 1, 0..] on q_proj of 2 layers, the same adapter, an orthogonal one, a base)."""
    W, U, V = base_weight([10.0, 5.0, 2.0, 0.5])
    names = [Q, "model.layers.1.self_attn.q_proj"]
    pairs = {n: factors([3, 2, 1, 0, 0, 0, 0, 0], scale=2.0, seed=i) for i, n in enumerate(names)}
    adapter = write_adapter(tmp_path / "a", pairs, r=8, alpha=16)
    same = write_adapter(tmp_path / "same", pairs, r=8, alpha=16)
    orth_pairs = {}
    for n, (A, _B) in pairs.items():
        P = torch.eye(IN) - torch.linalg.pinv(A) @ A  # onto the complement of A's row space (8 directions)
        orth_pairs[n] = ((torch.randn(4, IN) @ P).contiguous(), torch.randn(OUT, 4))
    other = write_adapter(tmp_path / "orth", orth_pairs, r=4, alpha=8)
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"{n}.weight": W.float() for n in names} | {"model.norm.weight": torch.ones(IN)},
              str(base / "model.safetensors"))
    return adapter, same, other, base


def test_cli_json(capsys, tmp_path):
    adapter, same, other, base = hand_built(tmp_path)
    rc, out, err = run(capsys, adapter, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert [m["module"] for m in d["modules"]] == [Q, "model.layers.1.self_attn.q_proj"]
    m = d["modules"][0]
    assert m["singular_values"] == pytest.approx([3, 2, 1, 0, 0, 0, 0, 0], abs=1e-6)
    assert m["stable_rank"] == pytest.approx(14 / 9, rel=1e-6) and (m["rank_90"], m["rank_99"]) == (2, 3)
    assert "amplification" not in m and d["base"] is None
    assert d["by_type"][0] | {"stable_rank": 0} == {"kind": "q_proj", "count": 2, "delta_norm": pytest.approx(14**0.5),
                                                     "stable_rank": 0, "rank_90": 2, "rank_99": 3}

    rc, out, err = run(capsys, adapter, "--json", "--base", base, "--compare", same)
    assert rc == 0, err
    m = json.loads(out)["modules"][0]
    for key in ("amplification", "random_baseline", "projection_norm", "weight_norm", "similarity"):
        assert key in m
    assert m["similarity_top1"] == pytest.approx(1.0)
    assert all(m["similarity"][i][i] == pytest.approx(1.0) for i in range(8))

    rc, out, err = run(capsys, adapter, "--json", "--compare", other, "--modules", r"layers\.1\.")
    assert rc == 0, err
    d = json.loads(out)
    assert [m["module"] for m in d["modules"]] == ["model.layers.1.self_attn.q_proj"] and d["compare_r"] == 4
    assert max(max(row) for row in d["modules"][0]["similarity"]) < 1e-5  # orthogonal row spaces


def test_cli_table_and_plots(capsys, tmp_path):
    adapter, same, _, base = hand_built(tmp_path)
    rc, out, err = run(capsys, adapter, "--base", base, "--compare", same, "--plot", tmp_path / "plots")
    assert rc == 0, err
    assert "self_attn.q_proj" in out and "by module type" in out and "amp" in out and "phi(1,1)" in out
    for name in ("spectrum.png", "amplification.png", "similarity_q_proj.png"):
        path = tmp_path / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, name
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["amplification.png", "similarity_q_proj.png",
                                                                      "spectrum.png"]  # no temp files left


def test_cli_bad_input_exit_2(capsys, tmp_path):
    adapter, _, _, base = hand_built(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({f"{Q}.weight": torch.zeros(IN, OUT)}, str(wrong / "model.safetensors"))  # transposed shape
    cases = [
        ((tmp_path / "empty").mkdir() or (tmp_path / "empty",), "not a PEFT adapter folder"),
        ((tmp_path / "nope",), "not a PEFT adapter folder"),
        ((adapter, "--modules", "("), "not a valid regular expression"),
        ((adapter, "--modules", "mlp"), "matches none"),
        ((adapter, "--quant", "nf4"), "pass --base"),
        ((adapter, "--base", tmp_path / "missing"), "model folder not found"),
        ((adapter, "--base", wrong), "has shape"),
        ((adapter, "--base", tmp_path / "empty"), "no weights"),
        ((adapter, "--compare", tmp_path / "empty"), "not a PEFT adapter folder"),
    ]
    for args, msg in cases:
        rc, out, err = run(capsys, *args)
        assert rc == 2 and msg in err and "Traceback" not in err and not out, (args, err)


def test_untrained_adapter_json_is_valid(capsys, tmp_path):
    _, _, _, base = hand_built(tmp_path)
    adapter = write_adapter(tmp_path / "zero", {Q: (torch.randn(4, IN), torch.zeros(OUT, 4))}, r=4, alpha=8)
    rc, out, err = run(capsys, adapter, "--json", "--base", base)
    assert rc == 0, err
    m = json.loads(out)["modules"][0]  # strict JSON: no NaN / inf
    assert m["singular_values"] == [0.0] * 4 and m["rank_99"] == 0 and m["amplification"] is None


# ---- a real tiny model on disk ---------------------------------------------------------------------------------


def tiny_adapter(folder: Path, model: Path, seed: int = 0) -> tuple[Path, dict]:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (cfg.hidden_size, cfg.hidden_size),
              "mlp.down_proj": (cfg.hidden_size, cfg.intermediate_size)}
    pairs = {f"model.layers.{l}.{n}": (torch.randn(4, i, generator=g) * 0.1, torch.randn(o, 4, generator=g) * 0.1)
             for l in range(cfg.num_hidden_layers) for n, (o, i) in shapes.items()}
    return write_adapter(folder, pairs, r=4, alpha=8), pairs


def dense_amplification(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """Independent reference: full SVD of the dense dW, top-r directions, the paper's ratio."""
    dW = scale * B.double() @ A.double()
    U, s, Vh = torch.linalg.svd(dW)
    r = A.shape[0]
    return float(dW.norm() / (U[:, :r].T @ W.double() @ Vh[:r].T).norm())


def stored_weight(model: Path, module: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(f"{module}.weight")


def test_tiny_model_base(capsys, tmp_path, tiny_model):
    adapter, pairs = tiny_adapter(tmp_path / "adapter", tiny_model)
    rc, out, err = run(capsys, adapter, "--base", tiny_model, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["quant"]["type"] == "none" and len(d["modules"]) == len(pairs) == 4
    for m in d["modules"]:
        A, B = pairs[m["module"]]
        expected = dense_amplification(stored_weight(tiny_model, m["module"]).float(), A, B, 2.0)
        assert m["amplification"] == pytest.approx(expected, rel=1e-6), m["module"]
        assert m["directions"] == 4 and m["random_baseline"] > 0


def test_run_folder_uses_the_quantized_base_as_trained(capsys, tmp_path, tiny_model, tiny_data):
    from conftest import tiny_recipe
    from qlora_kit.config import dump_recipe
    from qlora_kit.quant.bnb import QuantSpec, roundtrip

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(tiny_recipe(tiny_model, tiny_data, quant={"type": "nf4"})))
    _, pairs = tiny_adapter(run_dir / "adapter", tiny_model)
    rc, out, err = run(capsys, run_dir / "adapter", "--json", "--modules", "down_proj")  # RUN/adapter = the run
    assert rc == 0, err
    d = json.loads(out)
    assert d["base"] == str(tiny_model) and d["quant"]["type"] == "nf4" and d["quant"]["source"] == "recipe"
    spec = QuantSpec("nf4", 64, True, torch.bfloat16)
    rc, out_plain, err = run(capsys, run_dir, "--json", "--modules", "down_proj", "--quant", "none")
    assert rc == 0, err
    for m, plain in zip(d["modules"], json.loads(out_plain)["modules"]):
        A, B = pairs[m["module"]]
        W = roundtrip(stored_weight(tiny_model, m["module"]), spec, torch.bfloat16).float()  # (64, 176): unaligned
        assert m["amplification"] == pytest.approx(dense_amplification(W, A, B, 2.0), rel=1e-6)
        assert m["amplification"] != pytest.approx(plain["amplification"], rel=1e-6)  # the 4-bit base differs
    rc, out, err = run(capsys, run_dir, "--json", "--no-base")
    assert rc == 0 and json.loads(out)["base"] is None
