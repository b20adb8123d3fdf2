"""DPO whose target adapts: to each pair's score margin from the data (ODPO, ``inputs = {"margin"}``), to the
reward gaps of the batches seen so far (β-DPO, a stateful loss: its running statistics live in buffers that the
harness resets as every cell starts), and to the policy itself (TR-DPO, ``inputs = {"moving_reference"}``: the
reference moves toward the policy during training, so it is scored anew each step).

Rewards follow DPO: β·Δc and β·Δr, with the variant's base β.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench import LogProbs, LossOutput, Param, PreferenceLoss, hookimpl
from dpobench.losses import MOVING_REFERENCE, implicit_rewards, log_ratios

BETA = Param(0.1, "(0, inf)", "strength of the KL regularisation toward the reference (higher: stay closer)")

#: where ODPO's log of the score margin is floored: a pair the labeller scored a tie (margin 0) gets a finite offset
MARGIN_FLOOR = 1e-3


class ODPOLoss(PreferenceLoss):
    """ODPO: Direct Preference Optimization with an Offset (https://arxiv.org/abs/2402.10571).

    DPO that asks a pair's chosen answer to win by more where the labeller scored it far higher: the offset grows with
    the log of the pair's score margin, and a barely-preferred pair needs less of a margin than DPO asks.

    Formula:
        Δ_off = α·log(max(m, 10⁻³))
        ℓ = −logσ(β·(Δc − Δr) − Δ_off)

    Symbols: Δc, Δr log-ratios; m the pair's score margin from the data (input ``margin``: the synthetic task's gold
    difference, a data file's ``margin`` or ``score_chosen`` − ``score_rejected``); α the offset's scale.
    Convention: the official code (rycolab/odpo, `trainers.py`, `offset=True`, `ratio=False`): offset
    α·log(r_c − r_r), α = 1 (`config/loss/odpo.yaml`). The floor at 10⁻³ is dpobench's: the official data never has a
    margin of 0. Rewards β·Δc, β·Δr.

    Args:
        beta: β (paper 0.1 to 1 by task).
        alpha: α, the scale of the offset (0: DPO).
    """

    name = "odpo"
    paper = "https://arxiv.org/abs/2402.10571"
    inputs = frozenset({"margin"})
    params = {"beta": BETA, "alpha": Param(1.0, "[0, inf)", "α, scale of the offset α·log(score margin) (0: DPO)")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        offset = self.alpha * extras["margin"].to(dc.dtype).clamp(min=MARGIN_FLOOR).log()
        return LossOutput(-F.logsigmoid(self.beta * (dc - dr) - offset), *implicit_rewards(self.beta, dc, dr))


class BetaDPOLoss(PreferenceLoss):
    """β-DPO: Direct Preference Optimization with Dynamic β (https://arxiv.org/abs/2407.08639).

    DPO whose β follows the data: each batch's β grows with how far its reward gaps lie above their running mean (an
    easy, well-separated batch is held closer to the reference), and the pairs whose gaps are outliers of the running
    distribution are filtered out of the batch at random.

    Formula:
        A_i = (Δc − Δr)_i, detached;  M ← γ·M + (1−γ)·mean_B A,  S ← γ·S + (1−γ)·std_B A   (from 0, before the loss)
        w_i = exp(−½·((A_i − M)/S)²);  K = ⌊B·(1−ρ)⌋ pairs drawn ∝ w_i without replacement
        β_B = max(10⁻³, β·(1 + a·(mean_K A − M))), detached
        ℓ_i = −logσ(β_B·A'_i)·[i ∈ K]·B/K,  A' the gaps with their gradient

    Symbols: γ = 0.9 the running statistics' momentum; ρ the filtered fraction; a the scale of β's adaptation.
    Convention: the official code (junkangwu/beta-DPO, `trainers.py`, `mode_loss=beta_DPO`): the running mean and
    standard deviation updated with the batch before its loss, and the loss the mean over the kept pairs (here
    ℓ_i·B/K per kept pair, so that the harness's mean over the batch is that mean); ρ = 0.2 and a = 0.6, its README's
    example. dpobench keeps at least one pair (K ≥ 1: a batch of one) and floors S at 10⁻⁶ (at the first step the
    policy is the reference and every gap is 0: the draw is then uniform). The statistics update in training only,
    and reset as each cell starts. Rewards β·Δc, β·Δr with the base β.

    Args:
        beta: β, the base (paper 0.1).
        scale: a, how strongly β follows the batch's gaps (0: a fixed β).
        filter_ratio: ρ, the fraction of each batch filtered out.
    """

    name = "beta_dpo"
    paper = "https://arxiv.org/abs/2407.08639"
    batch_coupled = True  # β, the filter and the mean over the kept pairs are the batch's
    params = {
        "beta": BETA,
        "scale": Param(0.6, "[0, inf)", "a, how strongly β follows the batch's reward gaps (0: fixed β)"),
        "filter_ratio": Param(0.2, "[0, 1)", "ρ, fraction of each batch filtered out as outliers"),
    }
    momentum = 0.9

    def __init__(self, **hparams: object) -> None:
        super().__init__(**hparams)
        self.register_buffer("gap_mean", torch.zeros(()))
        self.register_buffer("gap_std", torch.zeros(()))

    def reset(self) -> None:
        self.gap_mean.zero_()
        self.gap_std.zero_()

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        logits = dc - dr
        gaps = logits.detach().float()
        if self.training:
            spread = gaps.std() if gaps.numel() > 1 else gaps.new_zeros(())
            self.gap_mean.mul_(self.momentum).add_(gaps.mean(), alpha=1 - self.momentum)
            self.gap_std.mul_(self.momentum).add_(spread, alpha=1 - self.momentum)
        b = gaps.numel()
        weight = torch.exp(-0.5 * ((gaps - self.gap_mean) / self.gap_std.clamp(min=1e-6)) ** 2)
        kept = max(1, math.floor(b * (1 - self.filter_ratio)))
        index = torch.multinomial(weight.clamp(min=1e-30), kept, replacement=False)
        mask = torch.zeros_like(gaps).index_fill(0, index, 1.0)
        beta = (self.beta * (1 + self.scale * (gaps.index_select(0, index).mean() - self.gap_mean))).clamp(min=1e-3)
        losses = -F.logsigmoid(beta.to(logits.dtype) * logits) * (mask * (b / kept)).to(logits.dtype)
        return LossOutput(losses, *implicit_rewards(self.beta, dc, dr))


class TRDPOLoss(PreferenceLoss):
    """TR-DPO: Learn Your Reference Model for Real Good Alignment (https://arxiv.org/abs/2404.09656).

    DPO against a reference that follows the policy: every τ steps the reference moves a fraction α of the way to
    the current policy, so the KL anchor loosens as training goes and the policy can drift further than under DPO.

    Formula:
        ℓ = −logσ(β·(Δc − Δr)),  Δ against the current π_ref
        after every τ-th step: π_ref ← (1 − α)·π_ref + α·π_θ   (α = 1: a hard update)

    Symbols: τ the update period in steps; α the soft update's mix.
    Convention: TRL 1.16 `DPOConfig(sync_ref_model=True)`, its `SyncRefModelCallback` mixing every parameter,
    α = 0.6 (`ref_model_mixup_alpha`'s default). τ = 32, the paper's smallest period, where TRL's default 512 would
    never update in a 150-step cell. The reference is scored anew each step (a reference forward pass the cached
    variants do not pay); held-out rewards and the KL column stay measured against the original reference.

    Args:
        beta: β (TRL default 0.1).
        sync_every: τ, steps between reference updates.
        mix: α, how far each update moves the reference toward the policy.
    """

    name = "tr_dpo"
    paper = "https://arxiv.org/abs/2404.09656"
    inputs = frozenset({MOVING_REFERENCE})
    params = {
        "beta": BETA,
        "sync_every": Param(32, "[1, inf)", "τ, optimizer steps between reference updates"),
        "mix": Param(0.6, "(0, 1]", "α, fraction of the way the reference moves to the policy (1: a copy)"),
    }

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        return LossOutput(-F.logsigmoid(self.beta * (dc - dr)), *implicit_rewards(self.beta, dc, dr))

    def reference_mix(self, step: int) -> float:
        return self.mix if step % self.sync_every == 0 else 0.0


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(ODPOLoss)
    register(BetaDPOLoss)
    register(TRDPOLoss)
