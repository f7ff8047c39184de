"""Preference losses against the papers' formulas written out here in float64 Python math (not our code), recipe
validation of the objective keys, and the preference data shape."""

import json
import math

import pytest
import torch

from conftest import make_tokenizer
from qlora_kit.config import DataConfig, recipe_from_dict
from qlora_kit.data import pipeline as data, preference as data_preference, tokens as data_tokens
from qlora_kit.errors import ConfigError, DataError
from qlora_kit.train import objectives


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def _tensors(seed=0, n=16):
    """Four (n,) float64 log-prob vectors of sequences of 3-60 tokens, and their token counts."""
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(3, 60, (n,), generator=g).double()
    nr = torch.randint(3, 60, (n,), generator=g).double()
    pc = -nc * torch.rand(n, generator=g, dtype=torch.float64) * 3
    pr = -nr * torch.rand(n, generator=g, dtype=torch.float64) * 3
    rc = pc + torch.randn(n, generator=g, dtype=torch.float64) * 4
    rr = pr + torch.randn(n, generator=g, dtype=torch.float64) * 4
    return pc, pr, rc, rr, nc, nr


def _close(ours: torch.Tensor, ref: list[float]):
    assert ours.dtype == torch.float64
    assert max(abs(a - b) for a, b in zip(ours.tolist(), ref)) < 1e-6


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.45)])
def test_dpo_and_conservative_dpo_match_the_paper(beta, eps):
    pc, pr, rc, rr, _, _ = _tensors()
    losses, wc, wr = objectives.dpo(pc, pr, rc, rr, beta, eps)
    ref = []
    for a, b, c, d in zip(*(t.tolist() for t in (pc, pr, rc, rr))):
        x = beta * math.log(math.exp(a - c) / math.exp(b - d))  # beta log(pi_w/ref_w) - beta log(pi_l/ref_l)
        ref.append(-(1 - eps) * math.log(_sig(x)) - eps * math.log(_sig(-x)))
    _close(losses, ref)
    _close(wc, [beta * (a - c) for a, c in zip(pc.tolist(), rc.tolist())])
    _close(wr, [beta * (b - d) for b, d in zip(pr.tolist(), rr.tolist())])


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_ipo_matches_the_paper(tau):
    pc, pr, rc, rr, _, _ = _tensors(1)
    losses, _, _ = objectives.ipo(pc, pr, rc, rr, tau)
    ref = [(((a - b) - (c - d)) - 1 / (2 * tau)) ** 2
           for a, b, c, d in zip(*(t.tolist() for t in (pc, pr, rc, rr)))]
    _close(losses, ref)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_the_paper(lam):
    pc, pr, _, _, nc, nr = _tensors(2)
    losses, wc, wr = objectives.orpo(pc, pr, nc, nr, lam)
    ref = []
    for a, b, n, m in zip(*(t.tolist() for t in (pc, pr, nc, nr))):
        p_w, p_l = math.exp(a / n), math.exp(b / m)  # P(y|x) = exp(mean token log-prob)
        log_or = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
        ref.append(-a / n - lam * _logsig(log_or))  # L_SFT + lambda L_OR
    _close(losses, ref)
    _close(wc, [lam * a / n for a, n in zip(pc.tolist(), nc.tolist())])


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (10.0, 3.0), (0.1, 0.0)])
def test_simpo_matches_the_paper(beta, gamma):
    pc, pr, _, _, nc, nr = _tensors(3)
    losses, _, _ = objectives.simpo(pc, pr, nc, nr, beta, gamma)
    ref = [-_logsig(beta / n * a - beta / m * b - gamma) for a, b, n, m in zip(*(t.tolist() for t in (pc, pr, nc, nr)))]
    _close(losses, ref)


@pytest.mark.parametrize("beta,wd,wu,shift", [(0.1, 1.0, 1.0, 0.0), (0.5, 1.33, 0.7, 2.0), (0.1, 1.0, 1.0, -3.0)])
def test_kto_matches_the_paper(beta, wd, wu, shift):
    pc, pr, rc, rr, _, _ = _tensors(4)
    p, ref = torch.cat([pc, pr]), torch.cat([rc, rr])
    desirable = torch.arange(p.numel()) % 3 != 0
    kl_p, kl_r = pc.flip(0), rc.flip(0) - shift  # shift < 0 makes the mean KL estimate negative: z0 clamps to 0
    z0 = objectives.kto_reference_point(kl_p, kl_r)
    z0_ref = max(0.0, sum(a - b for a, b in zip(kl_p.tolist(), kl_r.tolist())) / kl_p.numel())
    assert abs(float(z0) - z0_ref) < 1e-9
    losses, rewards, _ = objectives.kto(p, ref, desirable, z0, beta, wd, wu)
    expect = []
    for a, b, d in zip(p.tolist(), ref.tolist(), desirable.tolist()):
        r = a - b  # log pi/ref
        v = wd * _sig(beta * (r - z0_ref)) if d else wu * _sig(beta * (z0_ref - r))
        expect.append((wd if d else wu) - v)  # lambda_y - v(x, y)
    _close(losses, expect)


def test_orpo_is_finite_for_answers_the_model_is_sure_of():
    """mean log-prob -> 0 (P -> 1): log(1 - P) through expm1 stays finite."""
    pc = torch.tensor([-1e-7, -1e-3], dtype=torch.float64)
    losses, _, _ = objectives.orpo(pc, pc - 5, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                                   0.1)
    assert torch.isfinite(losses).all()


def _recipe(**train):
    return recipe_from_dict({"data": {"format": "preference"}, "train": {"objective": "dpo", **train}})


def test_objective_keys_are_validated():
    assert _recipe(beta=0.3).train.beta == 0.3
    with pytest.raises(ConfigError, match="train.beta"):
        _recipe(beta=0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        _recipe(label_smoothing=0.5)
    with pytest.raises(ConfigError, match="simpo_gamma.*simpo"):
        _recipe(simpo_gamma=1.0)  # simpo's knob on a dpo run
    with pytest.raises(ConfigError, match="objective"):
        _recipe(objective="rlhf")
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        _recipe(betta=0.1)
    with pytest.raises(ConfigError, match="data.format to preference"):
        recipe_from_dict({"train": {"objective": "dpo"}})
    with pytest.raises(ConfigError, match="objective is sft"):
        recipe_from_dict({"data": {"format": "preference"}})
    with pytest.raises(ConfigError, match="precompute_reference"):
        _recipe(objective="orpo", precompute_reference=True)
    with pytest.raises(ConfigError, match="packing"):
        recipe_from_dict({"data": {"format": "preference", "packing": True}, "train": {"objective": "dpo"}})
    assert _recipe(objective="kto", kto_desirable_weight=1.33).train.kto_desirable_weight == 1.33


PAIRS = [{"prompt": f"Question {i}?", "chosen": "Yes, " + "fine " * (i % 5), "rejected": "No" + "!" * i}
         for i in range(6)]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pairs_tokenize_as_sft_answers_with_loss_on_the_answers_only(tmp_path):
    tok = make_tokenizer()
    cfg = DataConfig(path=str(_write(tmp_path / "p.jsonl", PAIRS)), format="preference", max_length=64, cache=False)
    t = data_tokens.tokenize_all(cfg, tok)
    assert len(t) == 12 and t.roles.tolist() == [1, 2] * 6 and t.records.tolist() == [i // 2 for i in range(12)]
    sft = DataConfig(path=str(_write(tmp_path / "a.jsonl", [{"instruction": r["prompt"], "output": r["chosen"]}
                                                            for r in PAIRS])), format="alpaca", max_length=64,
                     cache=False)
    s = data_tokens.tokenize_all(sft, tok)  # the chosen answers as alpaca SFT records: the same tokens and mask
    chosen = torch.cat([t.ids[t.offsets[i]:t.offsets[i + 1]] for i in range(0, 12, 2)])
    assert torch.equal(chosen, s.ids)
    ds = data.build(cfg, tok, seed=0)
    u = ds.train[0]
    c, r = u.examples
    assert data_preference.split(c)[0] == data_preference.split(r)[0]  # the same prompt tokens, no loss on them
    first = PAIRS[ds.train.tok.records[ds.train.groups[0][0]]]["prompt"]
    assert data.encode_prompt(first, tok, "preference") == data_preference.split(c)[0]  # generate asks as trained
    batch = data_preference.collate(ds.train[:3], data.pad_token_id(tok))
    assert batch["input_ids"].shape[0] == 6 and batch["desirable"].tolist() == [1] * 6


def test_message_lists_and_other_file_types(tmp_path):
    tok = make_tokenizer()
    conv = [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}]
    cfg = DataConfig(path=str(_write(tmp_path / "c.jsonl", conv)), format="preference", cache=False)
    t = data_tokens.tokenize_all(cfg, tok)
    text = tok.decode(t.ids[t.offsets[0]:t.offsets[1]][t.keep[t.offsets[0]:t.offsets[1]]].tolist())
    assert text == "hello world<|im_end|>"
    import datasets

    datasets.Dataset.from_list([{"q": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                for r in PAIRS]).to_parquet(str(tmp_path / "p.parquet"))
    pq = DataConfig(path=str(tmp_path / "p.parquet"), format="preference", columns={"prompt": "q"}, cache=False)
    js = DataConfig(path=str(_write(tmp_path / "p.jsonl", PAIRS)), format="preference", cache=False)
    assert torch.equal(data_tokens.tokenize_all(pq, tok).ids, data_tokens.tokenize_all(js, tok).ids)


@pytest.mark.parametrize("record,match", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "q", "chosen": 3, "rejected": "a"}, "must be a string or a list"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "true or false"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "differ before"),
])
def test_bad_records_name_the_line(tmp_path, record, match):
    cfg = DataConfig(path=str(_write(tmp_path / "bad.jsonl", [PAIRS[0], record])), format="preference")
    with pytest.raises(DataError, match=match) as e:
        data.check(cfg)
    assert "bad.jsonl:2" in str(e.value)


def test_unpaired_records_train_only_kto_and_long_prompts_are_dropped(tmp_path):
    tok = make_tokenizer()
    recs = [{"prompt": "q", "completion": "good", "label": True}, {"prompt": "p", "completion": "bad", "label": False},
            {"prompt": "hello world " * 40, "chosen": "a", "rejected": "b"}]
    cfg = DataConfig(path=str(_write(tmp_path / "k.jsonl", recs)), format="preference", max_length=32, cache=False)
    ds = data.build(cfg, tok, seed=0, paired=False)
    assert ds.stats["dropped"] == 1 and sorted(u.desirable for u in ds.train) == [False, True]
    with pytest.raises(DataError, match="only train.objective kto"):
        data.build(cfg, tok, seed=0, paired=True)
    batch = data_preference.collate(list(ds.train), data.pad_token_id(tok))
    # row 3 is unit 1's prompt with unit 0's answer: the mismatched pair z0 is estimated from
    ans0 = data_preference.split(ds.train[0].examples[0])[1]
    assert batch["input_ids"][3][batch["labels"][3] != -100].tolist() == ans0
