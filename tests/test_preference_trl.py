"""Our preference losses against TRL's own loss code (the `peers` extra pins trl), on the same log-prob tensors.

TRL 1.16's DPO and KTO losses are written inline in their trainers' _compute_loss; its CPO trainer's `cpo_loss`
(sigmoid with label smoothing, ipo, simpo) and ORPO trainer's `odds_ratio_loss` are methods over log-prob tensors,
called here unbound with just the attributes they read. cpo_loss is reference-free; given the log-ratios
log pi - log ref as its "policy" log-probs it computes exactly DPO's and IPO's losses."""

import os
from types import SimpleNamespace

import pytest
import torch

from qlora_kit.train import objectives
from test_preference_losses import _tensors

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental in TRL 1.x
trl = pytest.importorskip("trl", reason="trl is in the peers extra")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402


def _cpo(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    return SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                           simpo_gamma=simpo_gamma, accelerator=SimpleNamespace(device=torch.device("cpu")))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_equals_trl_sigmoid_loss_on_log_ratios(beta, eps):
    pc, pr, rc, rr, _, _ = _tensors(10)
    ours, wc, wr = objectives.dpo(pc, pr, rc, rr, beta, eps)
    theirs, tc, tr = CPOTrainer.cpo_loss(_cpo("sigmoid", beta, eps), pc - rc, pr - rr)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(wc, tc, rtol=0, atol=1e-6)
    torch.testing.assert_close(wr, tr, rtol=0, atol=1e-6)


def test_ipo_equals_trl_ipo_loss_on_log_ratios():
    pc, pr, rc, rr, _, _ = _tensors(11)
    ours, _, _ = objectives.ipo(pc, pr, rc, rr, 0.3)
    theirs, _, _ = CPOTrainer.cpo_loss(_cpo("ipo", 0.3), pc - rc, pr - rr)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (10.0, 3.0)])
def test_simpo_equals_trl_simpo_loss(beta, gamma):
    pc, pr, _, _, nc, nr = _tensors(12)
    ours, wc, _ = objectives.simpo(pc, pr, nc, nr, beta, gamma)
    theirs, tc, _ = CPOTrainer.cpo_loss(_cpo("simpo", beta, simpo_gamma=gamma), pc / nc, pr / nr)  # mean log-probs
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(wc, tc, rtol=0, atol=1e-6)


def test_orpo_odds_ratio_term_equals_trl():
    """TRL returns beta * log s(log odds ratio) (it adds its NLL term elsewhere, as a token mean over the batch's
    chosen tokens; ours is the paper's per-pair mean, -mean log p(chosen), added here)."""
    pc, pr, _, _, nc, nr = _tensors(13)
    ours, wc, _ = objectives.orpo(pc, pr, nc, nr, 0.25)
    ratio_term, tc, *_ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(
        device=torch.device("cpu"))), pc / nc, pr / nr)
    torch.testing.assert_close(ours, -(pc / nc) - ratio_term.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(wc, tc.double(), rtol=0, atol=1e-6)
