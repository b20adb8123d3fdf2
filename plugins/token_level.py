"""Token-level losses. LD-DPO and SamPO, two answers to DPO's length exploitation that reweigh or resample the
tokens a log-ratio sums, read per-token log-probs (``inputs = {"token_logps"}``: ``LogProbs.chosen_token_logps``
(B, L) and ``rejected_token_logps`` of policy and reference, right-padded with 0). TDPO reads the policy's
sequential KL from the reference over the whole vocabulary (``inputs = {"token_kl"}``: ``LogProbs.chosen_token_kl``,
a reference pass per step). The harness computes each only for a sweep with such a variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench import LogProbs, LossOutput, Param, PreferenceLoss, hookimpl
from dpobench.losses import TOKEN_KL, TOKEN_LOGPS, implicit_rewards, log_ratios

BETA = Param(0.1, "(0, inf)", "strength of the KL regularisation toward the reference (higher: stay closer)")


def _positions(per_token: Tensor) -> Tensor:
    """Column numbers 0 … L−1 of (B, L) per-token log-probs, as a (1, L) row."""
    return torch.arange(per_token.shape[1], device=per_token.device)[None, :]


def shared_length(policy: LogProbs) -> Tensor:
    """ℓ_s = min(|y_c|, |y_r|) per pair: the tokens chosen and rejected both have."""
    return torch.minimum(policy.chosen_tokens, policy.rejected_tokens)


class LDDPOLoss(PreferenceLoss):
    """LD-DPO: Length Desensitization in Direct Preference Optimization (https://arxiv.org/abs/2409.06411).

    DPO on log-probs whose tokens past the shorter answer's length count α < 1 times, so that the longer answer's
    extra tokens weigh less in the comparison and verbosity pays less.

    Formula:
        ℓ_s = min(|y_c|, |y_r|)
        log π̂(y) = Σ_{t ≤ ℓ_s} log π(y_t|x, y_<t) + α·Σ_{t > ℓ_s} log π(y_t|x, y_<t)   (same for π_ref)
        ℓ = −logσ(β·[(log π̂(y_c) − log π̂_ref(y_c)) − (log π̂(y_r) − log π̂_ref(y_r))])

    Symbols: |y| completion tokens; α the weight of the tokens past ℓ_s (α = 1 is DPO).
    Convention: TRL 1.16 `DPOConfig(ld_alpha=α)`, which weighs policy and reference log-probs alike and reports
    the rewards β·(log π̂ − log π̂_ref). TRL has no default (None turns it off); α = 0.5 is dpobench's.

    Args:
        beta: β (TRL default 0.1).
        alpha: α, the weight of the tokens past the shorter answer's length, in [0, 1].
    """

    name = "ld_dpo"
    paper = "https://arxiv.org/abs/2409.06411"
    inputs = frozenset({TOKEN_LOGPS})
    params = {"beta": BETA, "alpha": Param(0.5, "[0, 1]", "α, weight of the tokens past the shorter answer (1: DPO)")}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        shared = shared_length(policy)
        dc = self.desensitised(policy.chosen, policy.chosen_token_logps, shared) - self.desensitised(
            reference.chosen, reference.chosen_token_logps, shared
        )  # fmt: skip
        dr = self.desensitised(policy.rejected, policy.rejected_token_logps, shared) - self.desensitised(
            reference.rejected, reference.rejected_token_logps, shared
        )  # fmt: skip
        return LossOutput(-F.logsigmoid(self.beta * (dc - dr)), *implicit_rewards(self.beta, dc, dr))

    def desensitised(self, total: Tensor, per_token: Tensor | None, shared: Tensor) -> Tensor:
        """Σ_{t ≤ ℓ_s} + α·Σ_{t > ℓ_s}, written α·Σ_all + (1 − α)·Σ_{t ≤ ℓ_s}: the padding adds nothing to either."""
        assert per_token is not None
        head = (_positions(per_token) < shared[:, None]).to(per_token.dtype)
        return self.alpha * total + (1 - self.alpha) * (per_token * head).sum(1)


class SamPOLoss(PreferenceLoss):
    """SamPO: Eliminating Biased Length Reliance of DPO via Down-Sampled KL (https://arxiv.org/abs/2406.10957).

    DPO whose log-ratios sum the same number of tokens on both sides: the longer answer's per-token log-ratios are
    down-sampled at random to the shorter answer's length, so that length alone cannot make a margin.

    Formula:
        ℓ_s = min(|y_c|, |y_r|);  S_c, S_r: ℓ_s positions of y_c, y_r drawn uniformly without replacement
        Δ̂c = Σ_{t ∈ S_c} log π(y_c,t|…)/π_ref(y_c,t|…),  Δ̂r likewise over S_r
        ℓ = −logσ(β·(Δ̂c − Δ̂r))

    Symbols: the shorter answer keeps all its tokens (S is all of them).
    Convention: the official code (LuJunru/SamPO, `dpo_trainer.py`, `len_norm=True`) draws the longer side's
    positions with `torch.multinomial` per pair, and rewards β·Δ̂. It draws the reference's positions apart from the
    policy's; here one draw serves both, so that Δ̂ is a sum of per-token log-ratios, as the paper's down-sampled KL
    is. Draws come from torch's generator, which the harness seeds per cell: a cell is reproducible.

    Args:
        beta: β (paper default 0.1).
    """

    name = "sampo"
    paper = "https://arxiv.org/abs/2406.10957"
    inputs = frozenset({TOKEN_LOGPS})
    params = {"beta": BETA}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        assert policy.chosen_token_logps is not None and policy.rejected_token_logps is not None
        assert reference.chosen_token_logps is not None and reference.rejected_token_logps is not None
        shared = shared_length(policy)
        keep_c = down_sample(policy.chosen_tokens, shared, policy.chosen_token_logps)
        keep_r = down_sample(policy.rejected_tokens, shared, policy.rejected_token_logps)
        dc = ((policy.chosen_token_logps - reference.chosen_token_logps) * keep_c).sum(1)
        dr = ((policy.rejected_token_logps - reference.rejected_token_logps) * keep_r).sum(1)
        return LossOutput(-F.logsigmoid(self.beta * (dc - dr)), *implicit_rewards(self.beta, dc, dr))


def down_sample(tokens: Tensor, keep: Tensor, per_token: Tensor) -> Tensor:
    """A (B, L) 0/1 mask of ``keep`` positions per row drawn uniformly without replacement from the row's first
    ``tokens``: each real position gets a uniform key, the padding a key of 2, and the ``keep`` smallest keys win
    (all of a row's positions when ``keep`` equals its ``tokens``). No count leaves the device."""
    key = torch.rand(per_token.shape, device=per_token.device)
    key = torch.where(_positions(per_token) < tokens[:, None], key, 2.0)
    rank = key.argsort(1).argsort(1)
    return (rank < keep[:, None]).to(per_token.dtype)


class TDPOLoss(PreferenceLoss):
    """TDPO: Token-level Direct Preference Optimization (https://arxiv.org/abs/2404.11999).

    DPO with the KL constraint taken token by token: each answer's log-ratio is corrected by the policy's sequential
    KL from the reference (the KL over the whole vocabulary at each of its positions, summed), which keeps the
    per-token distributions close while the preference margin grows.

    Formula:
        D_c = Σ_t KL(π_ref(·|x, y_c,<t) ‖ π(·|x, y_c,<t)),  D_r likewise
        TDPO1: u = (Δc − Δr) − (D_r − D_c);   TDPO2: u = (Δc − Δr) − α·(D_r − sg(D_c))
        ℓ = −logσ(β·u)

    Symbols: Δc, Δr log-ratios; D the sequential KL (input ``token_kl``, with its gradient); sg stop-gradient;
    α the weight of the KL term in TDPO2.
    Convention: the official code (Vance0124/Token-level-Direct-Preference-Optimization, `trainers.py`,
    `tdpo_loss`): rewards β·(Δ + D), α = 0.5 and β = 0.1 (`config/loss/tdpo.yaml`); TDPO2 (the paper's best) by
    default, `tdpo1=true` for TDPO1 (the configuration's own default). The reference is scored in the step: a
    reference forward pass the cached variants do not pay.

    Args:
        beta: β (paper 0.1).
        alpha: α, the weight of TDPO2's KL term.
        tdpo1: TDPO1's loss instead of TDPO2's (α unused).
    """

    name = "tdpo"
    paper = "https://arxiv.org/abs/2404.11999"
    inputs = frozenset({TOKEN_KL})
    params = {
        "beta": BETA,
        "alpha": Param(0.5, "[0, inf)", "α, weight of TDPO2's sequential-KL term"),
        "tdpo1": Param(False, doc="TDPO1's loss (the KL difference with both gradients, weight 1)"),
    }

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None and policy.chosen_token_kl is not None and policy.rejected_token_kl is not None
        dc, dr = log_ratios(policy, reference)
        kl_c, kl_r = policy.chosen_token_kl, policy.rejected_token_kl
        if self.tdpo1:
            u = (dc - dr) - (kl_r - kl_c)
        else:
            u = (dc - dr) - self.alpha * (kl_r - kl_c.detach())
        return LossOutput(-F.logsigmoid(self.beta * u), *implicit_rewards(self.beta, dc + kl_c, dr + kl_r))


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(LDDPOLoss)
    register(SamPOLoss)
    register(TDPOLoss)
