"""The tutorial notebook's own variants (``shared/seed``), exactly as it defines them.

The notebook only simulated their training; dpobench trains them for real. Its "Robust DPO" is not
rDPO (arXiv 2403.00409, the variant `robust_dpo`) and its "KL-DPO" is not an f-divergence: both are
DPO plus a squared penalty, kept under the `seed_` prefix so that nobody mistakes them for the papers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpobench import LogProbs, LossOutput, Param, PreferenceLoss, Study, hookimpl
from dpobench.losses import log_ratios

BETA = Param(0.1, "(0, inf)", "strength of the KL regularisation toward the reference (higher: stay closer)")


class SeedRobustDPOLoss(PreferenceLoss):
    """The seed's "Robust DPO": DPO (https://arxiv.org/abs/2305.18290) plus an η-penalty on the implicit rewards.

    Formula:
        ℓ = −logσ(r_c − r_r) + η·(r_c² + r_r²),    r_c = β·Δc, r_r = β·Δr

    Symbols: Δc, Δr log-ratios of chosen and rejected; η the penalty weight.
    Convention: the seed notebook's `RobustDPOLoss` (its default η = 0.1; its comparison used 0.05).
    Rewards r_c, r_r.

    Args:
        beta: β (seed default 0.1).
        eta: η, weight of the squared-reward penalty.
    """

    name = "seed_robust_dpo"
    paper = "https://arxiv.org/abs/2305.18290"
    monotone = False  # the squared penalty grows with either reward
    params = {"beta": BETA, "eta": Param(0.1, "[0, inf)", "η, weight of the squared-reward penalty")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        r_c, r_r = self.beta * dc, self.beta * dr
        losses = -F.logsigmoid(r_c - r_r) + self.eta * (r_c**2 + r_r**2)
        return LossOutput(losses, r_c.detach(), r_r.detach())


class SeedKLDPOLoss(PreferenceLoss):
    """The seed's "KL-DPO": DPO (https://arxiv.org/abs/2305.18290) plus a squared log-ratio penalty.

    Formula:
        ℓ = −logσ(β·(Δc − Δr)) + k·(Δc² + Δr²)

    Symbols: Δc, Δr log-ratios; k the penalty weight (a quadratic stand-in for the KL to the reference).
    Convention: the seed notebook's `KLDPOLoss`. Rewards β·Δc, β·Δr.

    Args:
        beta: β (seed default 0.1).
        kl_weight: k, weight of the squared log-ratio penalty (seed default 0.01).
    """

    name = "seed_kl_dpo"
    paper = "https://arxiv.org/abs/2305.18290"
    monotone = False  # the squared penalty grows with either log-ratio
    params = {"beta": BETA, "kl_weight": Param(0.01, "[0, inf)", "weight of the squared log-ratio penalty")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        losses = -F.logsigmoid(self.beta * (dc - dr)) + self.kl_weight * (dc**2 + dr**2)
        return LossOutput(losses, (self.beta * dc).detach(), (self.beta * dr).detach())


class SeedCustomDPOLoss(PreferenceLoss):
    """The seed's custom DPO exercise: DPO (https://arxiv.org/abs/2305.18290) with length normalisation, confidence weighting and temperature.

    Formula:
        p̂ = p/|y| for all four log-probs     (length_normalization true)
        r_c = β·(p̂c − r̂c),  r_r = β·(p̂r − r̂r)
        ℓ = −logσ((r_c − r_r)/T) · c          (c = confidence weight when confidence_weighting is true)

    Symbols: |y| completion tokens (clamped ≥ 1); T the temperature; c the per-pair confidence from
    the data (`weight` column), 1 when the data has none.
    Convention: the seed notebook's `CustomDPOLoss`; rewards r_c, r_r after normalisation.

    Args:
        beta: β (seed default 0.1).
        temperature: T, divides the logits (seed default 1.0).
        length_normalization: divide log-probs by completion length (seed default true).
        confidence_weighting: multiply each pair's loss by its confidence weight (seed default true).
    """

    name = "seed_custom_dpo"
    paper = "https://arxiv.org/abs/2305.18290"
    inputs = frozenset({"weights"})
    params = {
        "beta": BETA,
        "temperature": Param(1.0, "(0, inf)", "T, divides the logits"),
        "length_normalization": Param(True, None, "divide log-probs by completion length"),
        "confidence_weighting": Param(True, None, "weight each pair's loss by its confidence"),
    }

    def forward(
        self, policy: LogProbs, reference: LogProbs | None, weights: Tensor | None = None, **extras: Tensor
    ) -> LossOutput:
        assert reference is not None
        pc, pr, rc, rr = policy.chosen, policy.rejected, reference.chosen, reference.rejected
        if self.length_normalization:
            lc, lr = policy.chosen_tokens.clamp(min=1), policy.rejected_tokens.clamp(min=1)
            pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
        r_c, r_r = self.beta * (pc - rc), self.beta * (pr - rr)
        losses = -F.logsigmoid((r_c - r_r) / self.temperature)
        if self.confidence_weighting and weights is not None:
            losses = losses * weights
        return LossOutput(losses, r_c.detach(), r_r.detach())


#: the seed notebook's study of its custom loss: length normalisation × confidence weighting, trained with
#: ``--param seed_custom_dpo.length_normalization=false,true --param seed_custom_dpo.confidence_weighting=false,true``
CUSTOM_LOSS_STUDY = Study(
    params=("length_normalization", "confidence_weighting"),
    title="The seed's custom DPO loss, trained: each configuration (means over its cells)",
    text="Length normalisation × confidence weighting.",
    labels={(False, False): "standard", (True, False): "length-normalised", (False, True): "confidence-weighted",
            (True, True): "full"},
)  # fmt: skip


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(SeedRobustDPOLoss)
    register(SeedKLDPOLoss)
    register(SeedCustomDPOLoss, study=CUSTOM_LOSS_STUDY)
