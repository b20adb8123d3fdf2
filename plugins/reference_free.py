"""Reference-free variants: CPO, SimPO, ORPO and the SFT (NLL) term. The harness skips the reference
model for them; their rewards are β times the policy's (summed or averaged) log-probs, as in TRL.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench import LogProbs, LossOutput, Param, PreferenceLoss, hookimpl
from dpobench.losses import EXP_MAX, LabelSmoothingMixin, chosen_nll, implicit_rewards, smoothed_logsigmoid_loss


class CPOLoss(LabelSmoothingMixin, PreferenceLoss):
    """CPO: Contrastive Preference Optimization (https://arxiv.org/abs/2401.08417).

    DPO without the reference model (a uniform reference), plus a behaviour-cloning NLL on chosen.

    Formula:
        ℓ = −(1−ε)·logσ(β·(pc − pr)) − ε·logσ(−β·(pc − pr)) + α·NLL_c
        NLL_c = −Σ_B pc / Σ_B |y_c|      (token mean over the batch, the same for every pair)

    Symbols: pc, pr summed policy log-probs; |y_c| chosen completion tokens; ε label smoothing.
    Convention: TRL 1.16 `CPOTrainer` (`loss_type="sigmoid"`); rewards β·pc, β·pr.

    Args:
        beta: β (paper and TRL default 0.1).
        label_smoothing: ε, in [0, 0.5).
        cpo_alpha: α, weight of the NLL term (TRL default 1.0).
    """

    name = "cpo"
    paper = "https://arxiv.org/abs/2401.08417"
    reference_free = True
    params = {
        "beta": Param(0.1, "(0, inf)", "scale of the log-prob margin"),
        "label_smoothing": Param(0.0, "[0, 0.5)", "ε, cDPO-style label smoothing"),
        "cpo_alpha": Param(1.0, "[0, inf)", "weight of the NLL on chosen"),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.batch_coupled = self.cpo_alpha > 0  # NLL_c is the batch's token mean: each pair's loss shares it

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        losses = smoothed_logsigmoid_loss(self.beta * (policy.chosen - policy.rejected), self.label_smoothing)
        if self.cpo_alpha:
            losses = losses + self.cpo_alpha * chosen_nll(policy)
        return LossOutput(losses, *implicit_rewards(self.beta, policy.chosen, policy.rejected))


class SimPOLoss(LabelSmoothingMixin, PreferenceLoss):
    """SimPO: Simple Preference Optimization with a Reference-Free Reward (https://arxiv.org/abs/2405.14734).

    The average log-prob as implicit reward, with a target reward margin γ.

    Formula:
        z = β·(pc/|y_c| − pr/|y_r|) − γ
        ℓ = −(1−ε)·logσ(z) − ε·logσ(−z) + w·NLL_c

    Symbols: |y| completion tokens (clamped ≥ 1); γ the target margin; NLL_c as in `cpo`.
    Convention: official SimPO (princeton-nlp/SimPO): β = 2.0, γ = 0.5 (γ/β = 0.25), no NLL. The
    preset `simpo_trl` is TRL 1.16's `CPOTrainer(loss_type="simpo")` default: β = 0.1, γ = 0.5 and
    an NLL term of weight 1. Rewards β·pc/|y_c|, β·pr/|y_r|.

    Args:
        beta: β, the reward scale (official 2.0).
        gamma: γ, the target reward margin (official 0.5).
        label_smoothing: ε, in [0, 0.5).
        sft_weight: w, weight of the NLL on chosen (official 0; TRL 1.0).
    """

    name = "simpo"
    paper = "https://arxiv.org/abs/2405.14734"
    reference_free = True
    params = {
        "beta": Param(2.0, "(0, inf)", "scale of the average-log-prob reward"),
        "gamma": Param(0.5, "[0, inf)", "target reward margin γ"),
        "label_smoothing": Param(0.0, "[0, 0.5)", "ε, cDPO-style label smoothing"),
        "sft_weight": Param(0.0, "[0, inf)", "weight of the NLL on chosen"),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.batch_coupled = self.sft_weight > 0  # NLL_c is the batch's token mean: each pair's loss shares it

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        avg_c = policy.chosen / policy.chosen_tokens.clamp(min=1)
        avg_r = policy.rejected / policy.rejected_tokens.clamp(min=1)
        losses = smoothed_logsigmoid_loss(self.beta * (avg_c - avg_r) - self.gamma, self.label_smoothing)
        if self.sft_weight:
            losses = losses + self.sft_weight * chosen_nll(policy)
        return LossOutput(losses, *implicit_rewards(self.beta, avg_c, avg_r))


class AlphaPOLoss(PreferenceLoss):
    """AlphaPO: Reward Shape Matters for LLM Alignment (https://arxiv.org/abs/2501.03884).

    SimPO's length-normalised reward bent by a shape parameter α; α → 0 is SimPO's reward.

    Formula:
        a = pc/|y_c|, b = pr/|y_r|        (average per-token log-probs)
        r(a) = (1 − e^(−α·a)) / α         (= (1 − p̄^(−α))/α with p̄ = e^a; r(a) = a at α = 0)
        ℓ = −logσ(β·(r(a) − r(b)) − γ)

    Symbols: |y| completion tokens (clamped ≥ 1); γ the target margin, as in `simpo`.
    Convention: TRL's `CPOTrainer(loss_type="simpo", alpha=α)` (TRL ≥ 0.22, PR #3824), without its NLL
    term (`cpo_alpha=0`, as the paper) and label smoothing; defaults the paper's Mistral-Instruct setting
    as TRL's documentation quotes it (α = 0.25, β = 2.5, γ = 0.1); the exponent is clamped at 80 (TRL's
    overflows for very unlikely responses). Rewards β·r(a), β·r(b).

    Args:
        alpha: α, the reward's shape (0: SimPO's; the authors' trainer defaulted to −1).
        beta: β, the reward scale.
        gamma: γ, the target reward margin.
    """

    name = "alphapo"
    paper = "https://arxiv.org/abs/2501.03884"
    reference_free = True
    params = {
        "alpha": Param(0.25, "[-5, 5]", "α, the reward's shape (0: SimPO's log-prob reward)"),
        "beta": Param(2.5, "(0, inf)", "scale of the shaped reward"),
        "gamma": Param(0.1, "[0, inf)", "target reward margin γ"),
    }

    def reward(self, average: Tensor) -> Tensor:
        if self.alpha == 0:
            return average
        # in float32 at least (bf16 log-probs are promoted), as TRL's; the exponent clamped, as the f-divergence
        # scores' are, so that a very unlikely response (where TRL's code overflows) gives a finite, saturated reward
        x = average.to(torch.promote_types(average.dtype, torch.float32))
        return (1 - torch.exp((-self.alpha * x).clamp(max=EXP_MAX))) / self.alpha

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        r_c = self.reward(policy.chosen / policy.chosen_tokens.clamp(min=1))
        r_r = self.reward(policy.rejected / policy.rejected_tokens.clamp(min=1))
        return LossOutput(-F.logsigmoid(self.beta * (r_c - r_r) - self.gamma), *implicit_rewards(self.beta, r_c, r_r))


class SimPERLoss(PreferenceLoss):
    """SimPER: A Minimalist Approach to Preference Alignment without Hyperparameters (https://arxiv.org/abs/2502.00883).

    Raises the chosen response's inverse perplexity and lowers the rejected one's; no β, no margin, no reference.

    Formula:
        ℓ = −e^(pc/|y_c|) + e^(pr/|y_r|)

    Symbols: e^(p/|y|) the inverse perplexity (the geometric-mean token probability); |y| clamped ≥ 1.
    Convention: the official trainer (tengxiao1/SimPER, `scripts/simper_trainer.py`, `loss_type="SimPER"`),
    which ignores the β and γ its configs set; rewards its logged mean log-probs pc/|y_c|, pr/|y_r| (the
    loss is not a function of a reward difference).
    """

    name = "simper"
    paper = "https://arxiv.org/abs/2502.00883"
    reference_free = True

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        a = policy.chosen / policy.chosen_tokens.clamp(min=1)
        b = policy.rejected / policy.rejected_tokens.clamp(min=1)
        return LossOutput(-torch.exp(a) + torch.exp(b), a.detach(), b.detach())


class ORPOLoss(PreferenceLoss):
    """ORPO: Monolithic Preference Optimization without Reference Model (https://arxiv.org/abs/2403.07691).

    SFT plus an odds-ratio penalty that makes the rejected answer less likely relative to the chosen.

    Formula:
        log_odds = (ac − ar) − (log(1 − e^ac) − log(1 − e^ar)),    a = log-prob / |y|
        ℓ = NLL_c − β·logσ(log_odds)

    Symbols: ac, ar average per-token log-probs (computed in float32); NLL_c as in `cpo`; β the
    paper's λ.
    Convention: TRL 1.16 `ORPOTrainer`, except that the NLL covers completion tokens only (TRL's
    covers prompt and completion; dpobench never sees prompt log-probs). Averages are clamped at
    −1e-6 so that a response of probability 1 gives a finite odds ratio. Rewards β·ac, β·ar.

    Args:
        beta: λ, weight of the odds-ratio term (paper and TRL default 0.1).
    """

    name = "orpo"
    paper = "https://arxiv.org/abs/2403.07691"
    reference_free = True
    batch_coupled = True  # NLL_c is the batch's token mean
    params = {"beta": Param(0.1, "(0, inf)", "λ, weight of the odds-ratio term")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        avg_c = (policy.chosen.float() / policy.chosen_tokens.clamp(min=1)).clamp(max=-1e-6)
        avg_r = (policy.rejected.float() / policy.rejected_tokens.clamp(min=1)).clamp(max=-1e-6)
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        losses = chosen_nll(policy).float() - self.beta * F.logsigmoid(log_odds)
        return LossOutput(losses, *implicit_rewards(self.beta, avg_c, avg_r))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate near 0 and for very negative x (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class SFTLoss(PreferenceLoss):
    """SFT term: NLL of the chosen responses, as used by RPO (https://arxiv.org/abs/2404.19733) and MPO.

    Not a preference loss on its own: the component that combinations (`rpo`, `mpo`) add to keep
    the chosen answers likely.

    Formula:
        ℓ = NLL_c = −Σ_B pc / Σ_B |y_c|      (the same value for every pair of the batch)

    Symbols: pc summed policy log-probs of chosen; |y_c| their completion tokens.
    Convention: TRL 1.16 `sft` loss. Reference-free here (TRL runs the reference anyway and reports
    rewards β·Δ); rewards β·pc, β·pr.

    Args:
        beta: β, used only to scale the reported rewards (and shared in combinations).
    """

    name = "sft"
    paper = "https://arxiv.org/abs/2404.19733"
    reference_free = True
    batch_coupled = True  # the batch's token mean, the same for every pair
    params = {"beta": Param(0.1, "(0, inf)", "scale of the reported rewards")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        return LossOutput(chosen_nll(policy), *implicit_rewards(self.beta, policy.chosen, policy.rejected))


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(CPOLoss, tags=("main",))
    register(SimPOLoss, tags=("main",))
    register(SimPOLoss, name="simpo_trl", beta=0.1, gamma=0.5, sft_weight=1.0)
    register(ORPOLoss, tags=("main",))
    register(SFTLoss)
    register(AlphaPOLoss)
    register(SimPERLoss)
