"""Losses on the two log-ratios separately (NCA, BCO, SPPO, APO, paired KTO, DPO-Shift, χPO) and the batch-level
AOT losses.

Rewards follow TRL 1.16: β·Δc and β·Δr.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench import LogProbs, LossOutput, Param, PreferenceLoss, hookimpl
from dpobench.losses import EXP_MAX, LabelSmoothingMixin, implicit_rewards, log_ratios, smoothed_logsigmoid_loss

BETA = Param(0.1, "(0, inf)", "strength of the KL regularisation toward the reference (higher: stay closer)")


class _LogRatioLoss(PreferenceLoss):
    """Shared skeleton: a per-pair function of Δc and Δr; rewards β·Δ."""

    params = {"beta": BETA}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        return LossOutput(self.pair_loss(dc, dr), *implicit_rewards(self.beta, dc, dr))

    def pair_loss(self, dc: Tensor, dr: Tensor) -> Tensor:
        raise NotImplementedError


class NCAPairLoss(_LogRatioLoss):
    """NCA: Noise Contrastive Alignment of Language Models with Explicit Rewards (https://arxiv.org/abs/2402.05369).

    Optimises absolute likelihoods: pushes the chosen reward up and both rewards away from large values.

    Formula:
        ℓ = −logσ(β·Δc) − ½·logσ(−β·Δc) − ½·logσ(−β·Δr)

    Symbols: Δc = log π(y_c|x)/π_ref(y_c|x), Δr likewise.
    Convention: TRL 1.16 `nca_pair`.

    Args:
        beta: β (TRL default 0.1).
    """

    name = "nca_pair"
    paper = "https://arxiv.org/abs/2402.05369"
    monotone = False  # the −½·logσ(−β·Δc) term pulls Δc back once it is large

    def pair_loss(self, dc: Tensor, dr: Tensor) -> Tensor:
        z_c, z_r = self.beta * dc, self.beta * dr
        return -F.logsigmoid(z_c) - 0.5 * F.logsigmoid(-z_c) - 0.5 * F.logsigmoid(-z_r)


class BCOPairLoss(_LogRatioLoss):
    """BCO (paired): Binary Classifier Optimization for Large Language Model Alignment (https://arxiv.org/abs/2404.04656).

    A binary classifier that calls chosen responses good and rejected ones bad.

    Formula:
        ℓ = −logσ(β·Δc) − logσ(−β·Δr)

    Symbols: as in `nca_pair`.
    Convention: TRL 1.16 `bco_pair`, without the running-mean reward shift δ of the paper's
    unpaired BCO (TRL ≤ 0.2x subtracted it; TRL's paper index still writes −logσ(β(Δc − Δr)), which
    is not what its code does).

    Args:
        beta: β (TRL default 0.1).
    """

    name = "bco_pair"
    paper = "https://arxiv.org/abs/2404.04656"

    def pair_loss(self, dc: Tensor, dr: Tensor) -> Tensor:
        return -F.logsigmoid(self.beta * dc) - F.logsigmoid(-self.beta * dr)


class SPPOHardLoss(_LogRatioLoss):
    """SPPO (hard labels): Self-Play Preference Optimization for Language Model Alignment (https://arxiv.org/abs/2405.00675).

    Regresses the chosen log-ratio onto +1/(2β) and the rejected onto −1/(2β) (win probability 1 and 0).

    Formula:
        ℓ = (Δc − 1/(2β))² + (Δr + 1/(2β))²

    Symbols: β = 1/η of the paper.
    Convention: TRL 1.16 `sppo_hard`.

    Args:
        beta: β = 1/η (TRL default 0.1).
    """

    name = "sppo_hard"
    paper = "https://arxiv.org/abs/2405.00675"
    monotone = False  # squared distances to targets

    def pair_loss(self, dc: Tensor, dr: Tensor) -> Tensor:
        target = 1 / (2 * self.beta)
        return (dc - target) ** 2 + (dr + target) ** 2


class APOZeroLoss(_LogRatioLoss):
    """APO-zero: Anchored Preference Optimization and Contrastive Revisions (https://arxiv.org/abs/2408.06266).

    For data whose chosen answers are better than the model's own: raise chosen, lower rejected.

    Formula:
        ℓ = 1 − σ(β·Δc) + σ(β·Δr)

    Symbols: as in `nca_pair`.
    Convention: TRL 1.16 `apo_zero`.

    Args:
        beta: β (TRL default 0.1).
    """

    name = "apo_zero"
    paper = "https://arxiv.org/abs/2408.06266"

    def pair_loss(self, dc: Tensor, dr: Tensor) -> Tensor:
        return 1 - torch.sigmoid(self.beta * dc) + torch.sigmoid(self.beta * dr)


class APODownLoss(_LogRatioLoss):
    """APO-down: Anchored Preference Optimization and Contrastive Revisions (https://arxiv.org/abs/2408.06266).

    For data whose chosen answers are worse than the model's own: lower both, rejected more.

    Formula:
        ℓ = σ(β·Δc) + 1 − σ(β·(Δc − Δr))

    Symbols: as in `nca_pair`.
    Convention: TRL 1.16 `apo_down`.

    Args:
        beta: β (TRL default 0.1).
    """

    name = "apo_down"
    paper = "https://arxiv.org/abs/2408.06266"
    monotone = False  # deliberately pushes the chosen log-ratio down

    def pair_loss(self, dc: Tensor, dr: Tensor) -> Tensor:
        return torch.sigmoid(self.beta * dc) + 1 - torch.sigmoid(self.beta * (dc - dr))


class KTOPairLoss(_LogRatioLoss):
    """KTO (paired): Model Alignment as Prospect Theoretic Optimization (https://arxiv.org/abs/2402.01306).

    KTO's value function on paired data: each answer's log-ratio against a reference point, the other side's
    batch-mean log-ratio, clamped at 0 (KTO's KL estimate).

    Formula:
        z_c = max(0, mean_B Δc),  z_r = max(0, mean_B Δr)
        ℓ = ½·[(1 − σ(β·(Δc − z_r))) + (1 − σ(β·(z_c − Δr)))]

    Symbols: Δc, Δr as in `nca_pair`; mean_B over the batch (not detached).
    Convention: TRL ≤ 0.9.4 `DPOTrainer(loss_type="kto_pair")` (removed in TRL 0.10 for `KTOTrainer`), which
    concatenates the two terms into 2B losses and averages them: the ½ makes each pair's loss the mean of its
    two, so the batch mean is TRL's. Rewards β·Δc, β·Δr.

    Args:
        beta: β (TRL default 0.1).
    """

    name = "kto_pair"
    paper = "https://arxiv.org/abs/2402.01306"
    batch_coupled = True  # the reference points are batch means

    def pair_loss(self, dc: Tensor, dr: Tensor) -> Tensor:
        kl_c, kl_r = dc.mean().clamp(min=0), dr.mean().clamp(min=0)
        return 0.5 * ((1 - torch.sigmoid(self.beta * (dc - kl_r))) + (1 - torch.sigmoid(self.beta * (kl_c - dr))))


class DPOShiftLoss(_LogRatioLoss):
    """DPO-Shift: Shifting the Distribution of Direct Preference Optimization (https://arxiv.org/abs/2502.07599).

    DPO with the rejected reward scaled down by λ ≤ 1, against the likelihood displacement of DPO that lowers the
    chosen answer's probability along with the rejected one's.

    Formula:
        ℓ = −logσ(β·Δc − λ·β·Δr)

    Symbols: Δc, Δr as in `nca_pair`; λ = 1 is DPO.
    Convention: the official trainer (Meaquadddd/DPO-Shift, `scripts/dposhift_trainer.py`) with a fixed λ
    (it also offers linear schedules of λ over training); λ = 0.95, the value its released models centre on
    (its configuration's own default, 1.0, is DPO). Rewards β·Δc, β·Δr.

    Args:
        beta: β (paper default 0.1).
        shift: λ, the rejected reward's scale, in (0, 1].
    """

    name = "dpo_shift"
    paper = "https://arxiv.org/abs/2502.07599"
    params = {"beta": BETA, "shift": Param(0.95, "(0, 1]", "λ, the rejected reward's scale (1: DPO)")}

    def pair_loss(self, dc: Tensor, dr: Tensor) -> Tensor:
        return -F.logsigmoid(self.beta * dc - self.shift * self.beta * dr)


class ChiPOLoss(_LogRatioLoss):
    """χPO: Chi-Squared Preference Optimization (https://arxiv.org/abs/2407.13399).

    DPO with its logarithmic link replaced by φ(z) = z + log z of the probability ratio z = π/π_ref: the objective it
    solves is regularised by the χ² divergence plus the KL, which charges far more than the KL alone for raising an
    answer's probability well above the reference's (pessimism against over-optimisation).

    Formula:
        φ(z) = z + log z;  h = β·φ(e^Δc) − β·φ(e^Δr) = β·(e^Δc − e^Δr) + β·(Δc − Δr)
        ℓ = −logσ(clip(h, −2·R_max, 2·R_max))

    Symbols: Δc, Δr as in `nca_pair`; e^Δ is the answer's probability ratio, from Δ clamped at 80 (finite in float32
        and bfloat16), computed in float32 at least and returned in the inputs' dtype; a pair whose h lies outside the clip has
        no gradient.
    Convention: the paper's Algorithm 1 (the paper: a one-line change to DPO; no official code was found to check it
        against). R_max bounds the reward; the default, ∞, clips nothing. Rewards β·φ(e^Δ), the χPO objective's
        implicit reward (DPO's is β·Δ).

    Args:
        beta: β (default 0.1, as DPO's).
        r_max: R_max, the reward bound: h is clipped at ±2·R_max (∞: no clip).
    """

    name = "chipo"
    paper = "https://arxiv.org/abs/2407.13399"
    params = {"beta": BETA, "r_max": Param(math.inf, "(0, inf]", "R_max, the reward bound; h is clipped at ±2·R_max")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dtype = policy.chosen.dtype
        # in float32 at least: e^Δ multiplies Δ's rounding (bfloat16's Δ = 70 ± 0.25 is e^Δ ± 28 %)
        wide = torch.promote_types(dtype, torch.float32)
        dc, dr = log_ratios(policy.to(wide), reference.to(wide))
        reward_c, reward_r = self.beta * chi_link(dc), self.beta * chi_link(dr)
        h = (reward_c - reward_r).clamp(-2 * self.r_max, 2 * self.r_max)
        return LossOutput(*(t.to(dtype) for t in (-F.logsigmoid(h), reward_c.detach(), reward_r.detach())))


def chi_link(log_ratio: Tensor) -> Tensor:
    """φ(e^Δ) = e^Δ + Δ, the exponential from Δ clamped at ``EXP_MAX``."""
    return log_ratio.clamp(max=EXP_MAX).exp() + log_ratio


class AOTLoss(LabelSmoothingMixin, PreferenceLoss):
    """AOT (paired): Distributional Preference Alignment of LLMs via Optimal Transport (https://arxiv.org/abs/2406.05882).

    First-order stochastic dominance of the chosen over the rejected reward distribution, in one
    dimension solved by sorting over the batch.

    Formula:
        d = sort_B(pc − pr) − sort_B(rc − rr)
        ℓ = −(1−ε)·logσ(β·d) − ε·logσ(−β·d)

    Symbols: sort_B sorts ascending over the batch; pc, pr, rc, rr policy and reference log-probs.
    Convention: TRL 1.16 `aot`. Batch-coupled: the i-th loss belongs to the i-th quantile, not to
    pair i, so a pair's loss depends on the rest of the batch. Rewards β·Δ per pair.

    Args:
        beta: β (TRL default 0.1).
        label_smoothing: ε, cDPO-style smoothing, in [0, 0.5).
    """

    name = "aot"
    paper = "https://arxiv.org/abs/2406.05882"
    batch_coupled = True
    params = {"beta": BETA, "label_smoothing": Param(0.0, "[0, 0.5)", "ε, cDPO-style label smoothing")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        d = self.sorted_difference(policy, reference)
        dc, dr = log_ratios(policy, reference)
        return LossOutput(
            smoothed_logsigmoid_loss(self.beta * d, self.label_smoothing), *implicit_rewards(self.beta, dc, dr)
        )

    def sorted_difference(self, policy: LogProbs, reference: LogProbs) -> Tensor:
        policy_margin, _ = torch.sort(policy.chosen - policy.rejected)
        reference_margin, _ = torch.sort(reference.chosen - reference.rejected)
        return policy_margin - reference_margin


class AOTUnpairedLoss(AOTLoss):
    """AOT (unpaired): Distributional Preference Alignment of LLMs via Optimal Transport (https://arxiv.org/abs/2406.05882).

    Dominance of the chosen log-ratio distribution over the rejected one, ignoring the pairing.

    Formula:
        d = sort_B(Δc) − sort_B(Δr)
        ℓ = −(1−ε)·logσ(β·d) − ε·logσ(−β·d)

    Symbols: Δc, Δr the log-ratios; sort_B as in `aot`.
    Convention: TRL 1.16 `aot_unpaired`; batch-coupled like `aot`.

    Args:
        beta: β (TRL default 0.1).
        label_smoothing: ε, cDPO-style smoothing, in [0, 0.5).
    """

    name = "aot_unpaired"

    def sorted_difference(self, policy: LogProbs, reference: LogProbs) -> Tensor:
        dc, dr = log_ratios(policy, reference)
        return torch.sort(dc)[0] - torch.sort(dr)[0]


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    for cls in (NCAPairLoss, BCOPairLoss, APODownLoss, AOTLoss, AOTUnpairedLoss, KTOPairLoss, DPOShiftLoss, ChiPOLoss):
        register(cls)
    for cls in (SPPOHardLoss, APOZeroLoss):  # in the `standard` preset
        register(cls, tags=("main",))
