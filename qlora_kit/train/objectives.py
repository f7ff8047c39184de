"""Preference losses as pure functions over per-sequence log-probabilities (fp32 tensors, one value per answer).

Inputs: `pc`, `pr` (P,) the policy's summed log-probabilities of the chosen / rejected answers (label tokens only),
`rc`, `rr` (P,) the reference policy's (the quantized base with every adapter off), `nc`, `nr` (P,) the answers'
label-token counts (for the length-normalised objectives). Each returns (losses (P,), chosen rewards (P,), rejected
rewards (P,)); rewards are detached and are what the objective itself treats as the implicit reward, so margin and
accuracy mean the same for every objective. The step's loss is the mean of `losses` over every pair of the step.

  dpo    Rafailov et al. 2023 (arXiv 2305.18290) eq. 7; label smoothing eps: conservative DPO (Mitchell 2023),
         -(1-eps) log s(beta h) - eps log s(-beta h), h = (pc - rc) - (pr - rr)
  ipo    Azar et al. 2023 (arXiv 2310.12036) eq. 17 on summed log-probabilities: (h - 1/(2 tau))^2, tau = beta
  orpo   Hong et al. 2024 (arXiv 2403.07691) eq. 6-7: -mean_c - lambda log s(log odds(c) - log odds(r)), with
         P = exp(mean log-prob per token), odds = P / (1 - P), lambda = beta
  simpo  Meng et al. 2024 (arXiv 2405.14734) eq. 6: -log s(beta mean_c - beta mean_r - gamma)
  kto    Ethayarajh et al. 2024 (arXiv 2402.01306) eq. 8: lambda_D (1 - s(beta (r - z0))) for desirable answers,
         lambda_U (1 - s(beta (z0 - r))) for undesirable ones, r = p - ref, z0 = max(0, mean KL estimate),
         detached; the mean over every mismatched pair of the optimizer step (all micro-batches and ranks:
         preference.step_z0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Out = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def dpo(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> Out:
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def ipo(pc, pr, rc, rr, beta: float) -> Out:
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) for log P = mean_logp < 0: log P - log(1 - exp(log P)), with expm1 for P near 1."""
    return mean_logp - torch.log(-torch.expm1(mean_logp))


def orpo(pc, pr, nc, nr, beta: float) -> Out:
    mc, mr = pc / nc, pr / nr  # mean log-probability per answer token
    losses = -mc - beta * F.logsigmoid(_log_odds(mc) - _log_odds(mr))
    return losses, (beta * mc).detach(), (beta * mr).detach()


def simpo(pc, pr, nc, nr, beta: float, gamma: float) -> Out:
    mc, mr = pc / nc, pr / nr
    return -F.logsigmoid(beta * (mc - mr) - gamma), (beta * mc).detach(), (beta * mr).detach()


def kl_sums(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """(2,): [sum of the log-ratios of mismatched (prompt, answer) pairs, their count]. Sums, so that the
    micro-batches and ranks of one optimizer step add up to the step's mean exactly."""
    d = kl_policy - kl_reference
    return torch.stack([d.sum(), d.new_tensor(float(d.numel()))])


def kto_z0(sums: torch.Tensor) -> torch.Tensor:
    """z0 from kl_sums (over any number of batches): the mean log-ratio, clamped at 0 and detached (the paper does
    not backpropagate through it)."""
    return (sums[0] / sums[1].clamp(min=1)).clamp(min=0).detach()


def kto_reference_point(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """z0 of one set of mismatched pairs."""
    return kto_z0(kl_sums(kl_policy, kl_reference))


def kto(p, ref, desirable, z0, beta: float, w_desirable: float = 1.0, w_undesirable: float = 1.0) -> Out:
    """Unpaired: `p`, `ref` (N,) log-probabilities of N answers, `desirable` (N,) bool. The rewards returned are
    (every answer's reward, same) so that callers pick desirable / undesirable ones by the mask."""
    r = p - ref
    losses = torch.where(desirable, w_desirable * (1 - torch.sigmoid(beta * (r - z0))),
                         w_undesirable * (1 - torch.sigmoid(beta * (z0 - r))))
    reward = (beta * r).detach()
    return losses, reward, reward
