"""The DPO family built on the reward difference δ = s(Δc) − s(Δr): DPO/cDPO, IPO, hinge, DPO with
length normalisation, robust DPO, EXO, DiscoPOP — each takes an f-divergence (f-DPO) modifier.

Rewards follow TRL 1.16: β·Δc and β·Δr, whatever the loss shape or f-divergence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench import LogProbs, LossOutput, Param, ParamError, PreferenceLoss, hookimpl
from dpobench.losses import EXP_MAX, LabelSmoothingMixin, implicit_rewards, log_ratios, smoothed_logsigmoid_loss

BETA = Param(0.1, "(0, inf)", "strength of the KL regularisation toward the reference (higher: stay closer)")

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

F_DIVERGENCE_PARAMS: dict[str, Param] = {
    "f_divergence": Param(
        "reverse_kl", F_DIVERGENCES, "regulariser between policy and reference (f-DPO, arXiv 2309.16240)"
    ),
    "f_alpha": Param(0.5, "[0, 1]", "α of the α-divergence, paper convention (TRL's coefficient is 1 − α)"),
}


def f_divergence_score(delta: Tensor, kind: str, alpha: float = 0.5) -> Tensor:
    """f'(u) at u = π/π_ref = exp(Δ): the score f-DPO puts where DPO puts Δ (arXiv 2309.16240, Table 1).

    reverse KL: Δ; forward KL: 1 − e^(−Δ); Jensen-Shannon: log 2 + logσ(Δ);
    α-divergence: (1 − e^(−αΔ))/α, which is Δ at α = 0 and forward KL at α = 1.
    """
    if kind == "reverse_kl":
        return delta
    x = delta.to(torch.promote_types(delta.dtype, torch.float32))  # exponentials in ≥ float32, as TRL
    if kind == "forward_kl":
        return 1 - torch.exp((-x).clamp(max=EXP_MAX))
    if kind == "js_divergence":
        return math.log(2) + torch.nn.functional.logsigmoid(x)
    if kind == "alpha_divergence":
        if alpha < 1e-6:
            return delta
        return (1 - torch.exp((-alpha * x).clamp(max=EXP_MAX))) / alpha
    raise ParamError(f"unknown f-divergence {kind!r}; use one of {', '.join(F_DIVERGENCES)}")


class _RewardDifferenceLoss(PreferenceLoss):
    """Shared skeleton: f-divergence scores of the log-ratios, then a per-pair shape of them."""

    params = {"beta": BETA, **F_DIVERGENCE_PARAMS}

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        assert reference is not None
        dc, dr = log_ratios(policy, reference)
        sc = f_divergence_score(dc, self.f_divergence, self.f_alpha)
        sr = f_divergence_score(dr, self.f_divergence, self.f_alpha)
        return LossOutput(self.pair_loss(sc, sr, policy), *implicit_rewards(self.beta, dc, dr))

    def pair_loss(self, sc: Tensor, sr: Tensor, policy: LogProbs) -> Tensor:
        raise NotImplementedError


class DPOLoss(LabelSmoothingMixin, _RewardDifferenceLoss):
    """DPO: Direct Preference Optimization (https://arxiv.org/abs/2305.18290).

    The Bradley-Terry likelihood of the preference under the implicit reward β·log π/π_ref (eq. 7),
    with conservative label smoothing (cDPO) for noisy labels.

    Formula:
        ℓ = −(1−ε)·logσ(β·δ) − ε·logσ(−β·δ),    δ = s(Δc) − s(Δr)

    Symbols: Δc = log π(y_c|x) − log π_ref(y_c|x), Δr likewise for y_r; s the f-divergence score
    (s(Δ) = Δ for reverse KL, the DPO default); ε the label smoothing.
    Convention: TRL 1.16 `sigmoid` at ε = 0. cDPO (E. Mitchell, "A note on DPO with noisy
    preferences", 2023) is ε > 0 as in TRL ≤ 0.29 — TRL 1.16 ignores label_smoothing here; the
    preset `cdpo` sets ε = 0.1. f-divergence in the paper's α convention (TRL's coefficient = 1 − α).

    Args:
        beta: β, the KL-regularisation strength (paper default 0.1).
        label_smoothing: ε, the assumed probability that a label is flipped (cDPO), in [0, 0.5).
        f_divergence: reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence (f-DPO).
        f_alpha: α of the α-divergence, paper convention.
    """

    name = "dpo"
    paper = "https://arxiv.org/abs/2305.18290"
    params = {
        **_RewardDifferenceLoss.params,
        "label_smoothing": Param(0.0, "[0, 0.5)", "cDPO: assumed probability that a label is flipped"),
    }

    def pair_loss(self, sc: Tensor, sr: Tensor, policy: LogProbs) -> Tensor:
        return smoothed_logsigmoid_loss(self.beta * (sc - sr), self.label_smoothing)


class DPONormLoss(_RewardDifferenceLoss):
    """DPO with length normalisation, the SimPO ablation "DPO w/ LN" (https://arxiv.org/abs/2405.14734).

    Formula:
        ℓ = −logσ(β·(s(Δc)/|y_c| − s(Δr)/|y_r|))

    Symbols: |y| completion token count (clamped ≥ 1); other symbols as in `dpo`.
    Convention: TRL 1.16 `sigmoid_norm` (also used by Tülu 3, arXiv 2411.15124).

    Args:
        beta: β (TRL default 0.1).
        f_divergence: f-divergence of the scores s.
        f_alpha: α of the α-divergence, paper convention.
    """

    name = "sigmoid_norm"
    paper = "https://arxiv.org/abs/2405.14734"

    def pair_loss(self, sc: Tensor, sr: Tensor, policy: LogProbs) -> Tensor:
        lc, lr = policy.chosen_tokens.clamp(min=1), policy.rejected_tokens.clamp(min=1)
        return -F.logsigmoid(self.beta * (sc / lc - sr / lr))


class HingeLoss(_RewardDifferenceLoss):
    """SLiC-HF / RSO hinge: Sequence Likelihood Calibration with Human Feedback (https://arxiv.org/abs/2305.10425).

    The reference-normalised hinge ("hinge-norm") of RSO (arXiv 2309.06657): a margin loss on δ.

    Formula:
        ℓ = max(0, 1 − β·δ),    δ = s(Δc) − s(Δr)

    Symbols: β = 1/margin; δ as in `dpo`.
    Convention: TRL 1.16 `hinge`; SLiC-HF's original reference-free calibration loss is not this.

    Args:
        beta: β, the inverse of the hinge margin (TRL default 0.1).
        f_divergence: f-divergence of the scores s.
        f_alpha: α of the α-divergence, paper convention.
    """

    name = "hinge"
    paper = "https://arxiv.org/abs/2305.10425"

    def pair_loss(self, sc: Tensor, sr: Tensor, policy: LogProbs) -> Tensor:
        return torch.relu(1 - self.beta * (sc - sr))


class IPOLoss(_RewardDifferenceLoss):
    """IPO: A General Theoretical Paradigm to Understand Learning from Human Preferences (https://arxiv.org/abs/2310.12036).

    Regresses the log-ratio margin onto a fixed target 1/(2τ) instead of pushing it to infinity.

    Formula:
        ℓ = (s(Δc)/|y_c| − s(Δr)/|y_r| − 1/(2β))²      (length_normalize true, TRL)
        ℓ = (s(Δc) − s(Δr) − 1/(2β))²                  (length_normalize false, the paper)

    Symbols: β plays the paper's τ; |y| completion tokens (clamped ≥ 1).
    Convention: TRL 1.16 `ipo` length-normalises (confirmed with the IPO authors, per TRL); the
    preset `ipo_paper` uses summed log-probs as the paper and TRL's online DPO do.

    Args:
        beta: τ, the regularisation strength (TRL default 0.1).
        length_normalize: divide each score by its completion length.
        f_divergence: f-divergence of the scores s.
        f_alpha: α of the α-divergence, paper convention.
    """

    name = "ipo"
    paper = "https://arxiv.org/abs/2310.12036"
    monotone = False  # a squared distance to a target margin: past the target the loss grows again
    params = {
        **_RewardDifferenceLoss.params,
        "length_normalize": Param(True, None, "divide scores by completion length (TRL) or not (paper)"),
    }

    def pair_loss(self, sc: Tensor, sr: Tensor, policy: LogProbs) -> Tensor:
        if self.length_normalize:
            sc, sr = sc / policy.chosen_tokens.clamp(min=1), sr / policy.rejected_tokens.clamp(min=1)
        return (sc - sr - 1 / (2 * self.beta)) ** 2


class RobustDPOLoss(_RewardDifferenceLoss):
    """rDPO: Provably Robust DPO: Aligning Language Models with Noisy Feedback (https://arxiv.org/abs/2403.00409).

    An unbiased estimate of the clean DPO loss when each label is flipped with probability ε.

    Formula:
        ℓ = [ −(1−ε)·logσ(β·δ) + ε·logσ(−β·δ) ] / (1 − 2ε)

    Symbols: ε the label-flip probability; δ as in `dpo`.
    Convention: TRL 1.16 `robust` (ε is TRL's `label_smoothing`). The default ε = 0.1 is the one the
    paper recommends; TRL's default 0.0 reduces it to DPO. Not cDPO: the sign and 1/(1−2ε) differ.

    Args:
        beta: β (paper and TRL default 0.1).
        label_smoothing: ε, the label-flip probability, in [0, 0.5).
        f_divergence: f-divergence of the scores s.
        f_alpha: α of the α-divergence, paper convention.
    """

    name = "robust_dpo"
    paper = "https://arxiv.org/abs/2403.00409"
    params = {
        **_RewardDifferenceLoss.params,
        "label_smoothing": Param(0.1, "[0, 0.5)", "ε, the probability that a label is flipped"),
    }

    def pair_loss(self, sc: Tensor, sr: Tensor, policy: LogProbs) -> Tensor:
        z, eps = self.beta * (sc - sr), self.label_smoothing
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


class EXOPairLoss(_RewardDifferenceLoss):
    """EXO: Towards Efficient Exact Optimization of Language Model Alignment (https://arxiv.org/abs/2402.00856).

    The reverse KL between the model's preference distribution σ(β·δ) and the ε-smoothed label.

    Formula:
        ℓ = σ(z)·(logσ(z) − log(1−ε)) + σ(−z)·(logσ(−z) − log ε),    z = β·δ

    Symbols: ε > 0 the label smoothing; δ as in `dpo`.
    Convention: TRL 1.16 `exo_pair` (which rejects ε = 0); paper default ε = 1e-3.

    Args:
        beta: β (TRL default 0.1).
        label_smoothing: ε, strictly between 0 and 1 (paper 1e-3).
        f_divergence: f-divergence of the scores s.
        f_alpha: α of the α-divergence, paper convention.
    """

    name = "exo_pair"
    paper = "https://arxiv.org/abs/2402.00856"
    monotone = False  # minimum at z = log((1−ε)/ε): EXO matches a smoothed label, it does not maximise
    params = {
        **_RewardDifferenceLoss.params,
        "label_smoothing": Param(1e-3, "(0, 1)", "ε of the smoothed target distribution"),
    }

    def pair_loss(self, sc: Tensor, sr: Tensor, policy: LogProbs) -> Tensor:
        z, eps = self.beta * (sc - sr), self.label_smoothing
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )


class DiscoPOPLoss(_RewardDifferenceLoss):
    """DiscoPOP: Discovering Preference Optimization Algorithms with and for LLMs (https://arxiv.org/abs/2406.08414).

    The log-ratio modulated loss (LRML) found by LLM-driven search: a blend of the logistic (DPO)
    and exponential losses, mixed by σ(z/τ).

    Formula:
        m = σ(z/τ),    ℓ = (1 − m)·(−logσ(z)) + m·exp(−z),    z = β·δ

    Symbols: τ the mixing temperature; δ as in `dpo`.
    Convention: TRL 1.16 `discopop`, except that exp(−z) is evaluated at min(−z, 80): where that
    clamp acts, m = σ(z/τ) is 0 in floating point, so values are unchanged and 0·∞ = NaN is avoided.

    Args:
        beta: β (TRL default 0.1).
        tau: τ, the temperature of the modulation (paper 0.05).
        f_divergence: f-divergence of the scores s.
        f_alpha: α of the α-divergence, paper convention.
    """

    name = "discopop"
    paper = "https://arxiv.org/abs/2406.08414"
    monotone = False  # the exponential branch is not monotone in z with the logistic one mixed in
    params = {**_RewardDifferenceLoss.params, "tau": Param(0.05, "(0, inf)", "τ, the modulation temperature")}

    def pair_loss(self, sc: Tensor, sr: Tensor, policy: LogProbs) -> Tensor:
        z = self.beta * (sc - sr)
        m = torch.sigmoid(z / self.tau)
        return (1 - m) * -F.logsigmoid(z) + m * torch.exp((-z).clamp(max=80.0))


F_DPO = "arXiv:2309.16240"  # Wang et al., Beyond Reverse KL (f-DPO)


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    # tags=("main",): the variants the `standard` preset trains
    register(DPOLoss, tags=("main",))
    register(DPOLoss, name="cdpo", paper="Mitchell 2023, cDPO note", tags=("main",), label_smoothing=0.1)
    register(DPOLoss, name="fdpo_forward_kl", paper=F_DPO, f_divergence="forward_kl")
    register(DPOLoss, name="fdpo_js", paper=F_DPO, f_divergence="js_divergence")
    register(DPOLoss, name="fdpo_alpha", paper=F_DPO, f_divergence="alpha_divergence", f_alpha=0.5)
    register(DPONormLoss)
    register(HingeLoss, tags=("main",))
    register(IPOLoss, tags=("main",))
    register(IPOLoss, name="ipo_paper", length_normalize=False)
    register(RobustDPOLoss, tags=("main",))
    register(EXOPairLoss)
    register(DiscoPOPLoss, tags=("main",))
