"""DPO with an extra regulariser, from outside TRL: R-DPO (length), DPOP (positive), Cal-DPO (calibration)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench import LogProbs, LossOutput, Param, PreferenceLoss, hookimpl
from dpobench.losses import implicit_rewards, log_ratios

BETA = Param(0.1, "(0, inf)", "strength of the KL regularisation toward the reference (higher: stay closer)")


class LengthRegularisedDPOLoss(PreferenceLoss):
    """R-DPO: Disentangling Length from Quality in Direct Preference Optimization (https://arxiv.org/abs/2403.19159).

    DPO derived from a length-penalised RL objective, so that length stops paying as reward.

    Formula:
        ℓ = −logσ(β·(Δc − Δr) + α·(|y_c| − |y_r|))

    Symbols: Δc, Δr log-ratios; |y| completion tokens; α the length-penalty weight.
    Convention: the paper's eq. (no official code; the same form as SimPO's baseline table): the true
    reward is β·log π/π_ref + α·|y| under the penalised objective. The paper tunes α per setup; 0.05
    is dpobench's default, not a paper value.

    Args:
        beta: β (paper 0.1).
        alpha: α, reward per token of the length penalty.
    """

    name = "len_reg_dpo"
    paper = "https://arxiv.org/abs/2403.19159"
    params = {"beta": BETA, "alpha": Param(0.05, "[0, inf)", "α, weight of the length regulariser")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        length_term = self.alpha * (policy.chosen_tokens - policy.rejected_tokens).to(dc.dtype)
        losses = -F.logsigmoid(self.beta * (dc - dr) + length_term)
        return LossOutput(losses, *implicit_rewards(self.beta, dc, dr))


class DPOPLoss(PreferenceLoss):
    """DPOP: Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive (https://arxiv.org/abs/2402.13228).

    Penalises any drop of the chosen log-prob below the reference's, which plain DPO allows.

    Formula:
        ℓ = −logσ(β·(Δc − Δr − λ·max(0, rc − pc)))

    Symbols: pc, rc policy and reference log-probs of chosen; λ the penalty weight.
    Convention: the paper's form, inside the log-sigmoid (Cerebras modelzoo `dpop_penalty_weight`,
    PaddleNLP `dpop_lambda`); some ports add the penalty outside, which is not the paper. λ = 5.0
    is Cerebras modelzoo's default (the paper uses 50 for some tasks).

    Args:
        beta: β (0.1, the DPO default).
        dpop_lambda: λ, weight of the positive penalty.
    """

    name = "dpop"
    paper = "https://arxiv.org/abs/2402.13228"
    params = {"beta": BETA, "dpop_lambda": Param(5.0, "[0, inf)", "λ, weight of the chosen-drop penalty")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        penalty = torch.relu(reference.chosen - policy.chosen)
        losses = -F.logsigmoid(self.beta * (dc - dr - self.dpop_lambda * penalty))
        return LossOutput(losses, *implicit_rewards(self.beta, dc, dr))


class CalDPOLoss(PreferenceLoss):
    """Cal-DPO: Calibrated Direct Preference Optimization for Language Model Alignment (https://arxiv.org/abs/2412.14516).

    A contrastive term without β plus a calibration that pins each log-ratio to ±1/(2β), so the
    implicit rewards match the scale of real rewards.

    Formula:
        ℓ = −logσ(Δc − Δr) + ½·[(Δc − 1/(2β))² + (Δr + 1/(2β))²]

    Symbols: Δc, Δr log-ratios.
    Convention: the official code (tengxiao1/Cal-DPO, "Cal-DPO" branch of `dpo_loss`): no β inside
    the sigmoid; its squared terms are batch means, the same after the harness averages. Official
    β = 0.002. Rewards β·Δ here (the official code logs policy log-probs).

    Args:
        beta: β, sets the calibration targets ±1/(2β) (official 0.002).
    """

    name = "cal_dpo"
    paper = "https://arxiv.org/abs/2412.14516"
    monotone = False  # the calibration terms are squared distances to targets
    params = {"beta": Param(0.002, "(0, inf)", "β; the log-ratios are calibrated to ±1/(2β)")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        target = 1 / (2 * self.beta)
        losses = -F.logsigmoid(dc - dr) + 0.5 * ((dc - target) ** 2 + (dr + target) ** 2)
        return LossOutput(losses, *implicit_rewards(self.beta, dc, dr))


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(LengthRegularisedDPOLoss, tags=("main",))
    register(DPOPLoss, tags=("main",))
    register(CalDPOLoss, tags=("main",))
