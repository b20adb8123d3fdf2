"""Losses on unpaired examples (``dpobench.UnpairedLoss``): KTO and APO-zero's unpaired form, as TRL 1.16's
``KTOTrainer`` computes them, and BCO as TRL 0.29's ``BCOTrainer`` did (TRL 1.x dropped it). Each example is a prompt, one completion and a label (desirable or not); a paired
sweep trains them on its pairs unrolled, and an ``unpaired-D:U`` scenario on thinned examples.

Rewards follow TRL: β·Δ, Δ = log π(y|x) − log π_ref(y|x), per example.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpobench import Completions, Param, UnpairedLoss, UnpairedOutput, hookimpl
from dpobench.losses import KL_LOGPS

BETA = Param(0.1, "(0, inf)", "strength of the KL regularisation toward the reference (higher: stay closer)")


class KTOLoss(UnpairedLoss):
    """KTO: Model Alignment as Prospect Theoretic Optimization (https://arxiv.org/abs/2402.01306).

    Kahneman-Tversky optimisation on unpaired data: each completion's log-ratio is a gain or a loss against a
    reference point, the policy's KL from the reference estimated on mismatched prompt/completion pairs; desirable
    completions are pushed above it and undesirable ones below, with separate weights.

    Formula:
        z₀ = max(0, mean_N [log π(y'_i|x_i) − log π_ref(y'_i|x_i)]), detached
        ℓ_i = λ_D·(1 − σ(β·(Δ_i − z₀)))  for a desirable y_i
        ℓ_i = λ_U·(1 − σ(β·(z₀ − Δ_i)))  for an undesirable y_i

    Symbols: Δ_i = log π(y_i|x_i) − log π_ref(y_i|x_i); y'_i another example's completion (input ``kl_logps``);
    λ_D, λ_U the desirable and undesirable weights.
    Convention: TRL 1.16 `KTOTrainer(loss_type="kto")`: the mean over the batch's examples, z₀ from the policy's
    log-probs without gradient. TRL pairs each prompt with the completion before it in its dataset batch; here with
    the next completion of one fixed random cycle over the examples, so the reference's mismatched log-probs are
    computed once per sweep. The paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3]: at 1:10 data, λ_D ≈ 10
    (`--param kto.desirable_weight=10`).

    Args:
        beta: β (TRL default 0.1).
        desirable_weight: λ_D.
        undesirable_weight: λ_U.
    """

    name = "kto"
    paper = "https://arxiv.org/abs/2402.01306"
    inputs = frozenset({KL_LOGPS})
    batch_coupled = True  # z₀ is the batch's
    params = {
        "beta": BETA,
        "desirable_weight": Param(1.0, "(0, inf)", "λ_D, weight of the desirable examples' losses"),
        "undesirable_weight": Param(1.0, "(0, inf)", "λ_U, weight of the undesirable examples' losses"),
    }

    def forward(self, policy: Completions, reference: Completions, **extras: Tensor) -> UnpairedOutput:
        assert policy.kl_logps is not None and reference.kl_logps is not None
        delta = policy.logps - reference.logps
        z0 = (policy.kl_logps - reference.kl_logps).mean().clamp(min=0).detach()
        gain = self.desirable_weight * (1 - torch.sigmoid(self.beta * (delta - z0)))
        loss = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z0 - delta)))
        return UnpairedOutput(torch.where(policy.desirable, gain, loss), (self.beta * delta).detach())


class APOZeroUnpairedLoss(UnpairedLoss):
    """APO-zero (unpaired): Anchored Preference Optimization (https://arxiv.org/abs/2408.06266).

    APO-zero's anchoring on unpaired data: raise the likelihood of desirable completions and lower that of
    undesirable ones, each against the reference alone, for when the desirable outputs are better than the model's.

    Formula:
        ℓ_i = 1 − σ(β·Δ_i)  for a desirable y_i;   ℓ_i = σ(β·Δ_i)  for an undesirable y_i

    Symbols: Δ_i = log π(y_i|x_i) − log π_ref(y_i|x_i).
    Convention: TRL 1.16 `KTOTrainer(loss_type="apo_zero_unpaired")` (no KL estimate), the mean over the batch's
    examples.

    Args:
        beta: β (TRL default 0.1).
    """

    name = "apo_zero_unpaired"
    paper = "https://arxiv.org/abs/2408.06266"
    params = {"beta": BETA}

    def forward(self, policy: Completions, reference: Completions, **extras: Tensor) -> UnpairedOutput:
        delta = policy.logps - reference.logps
        up = torch.sigmoid(self.beta * delta)
        return UnpairedOutput(torch.where(policy.desirable, 1 - up, up), (self.beta * delta).detach())


class BCOLoss(UnpairedLoss):
    """BCO: Binary Classifier Optimization for Large Language Model Alignment (https://arxiv.org/abs/2404.04656).

    Alignment as binary classification of unpaired examples: the implicit reward β·Δ is a logit, desirable
    completions the positive class and undesirable ones the negative, both shifted by δ, the running mean of every
    reward seen so far, which keeps the classifier's boundary where the rewards are.

    Formula:
        δ ← running mean of β·Δ over every example trained on, this batch included (from 0)
        ℓ_i = −logσ(β·Δ_i − δ)  for a desirable y_i;   ℓ_i = −logσ(−(β·Δ_i − δ))  for an undesirable y_i

    Symbols: Δ_i = log π(y_i|x_i) − log π_ref(y_i|x_i); δ the reward shift, detached.
    Convention: TRL 0.29 `trl.experimental.bco.BCOTrainer` (`bco_loss`, its `RunningMoments` mean, updated with the
    batch's rewards before its loss, in training only), the mean over the batch's examples; without the optional
    density-ratio classifier (`match_underlying_distribution`, off by default there too). δ is state: it resets as
    each cell starts. Rewards β·Δ.

    Args:
        beta: β (TRL default 0.1).
    """

    name = "bco"
    paper = "https://arxiv.org/abs/2404.04656"
    batch_coupled = True  # δ includes the batch's own rewards
    params = {"beta": BETA}

    def __init__(self, **hparams: object) -> None:
        super().__init__(**hparams)
        self.register_buffer("shift", torch.zeros((), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def reset(self) -> None:
        self.shift.zero_()
        self.seen.zero_()

    def forward(self, policy: Completions, reference: Completions, **extras: Tensor) -> UnpairedOutput:
        rewards = self.beta * (policy.logps - reference.logps)
        if self.training:  # the running mean, as TRL's RunningMoments keeps it
            batch = rewards.detach().double()
            self.seen.add_(batch.numel())
            self.shift.add_((batch.mean() - self.shift) * batch.numel() / self.seen)
        logits = rewards - self.shift.to(rewards.dtype)
        losses = -torch.nn.functional.logsigmoid(torch.where(policy.desirable, logits, -logits))
        return UnpairedOutput(losses, rewards.detach())


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(KTOLoss)
    register(APOZeroUnpairedLoss)
    register(BCOLoss)
