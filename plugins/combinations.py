"""Variants built from other variants, found through the registry (so they wrap third-party variants too,
``get_loss("wpo", base="my_loss")``): WPO weighting, and weighted combinations (RPO, MPO)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import dpobench
from dpobench import LogProbs, LossOutput, Param, ParamError, PreferenceLoss, hookimpl
from dpobench.losses import EXP_MAX


class WeightedPreferenceLoss(PreferenceLoss):
    """WPO: Enhancing RLHF with Weighted Preference Optimization (https://arxiv.org/abs/2406.11827).

    Re-weights each pair of a base variant by how likely the policy is to have produced it, which
    corrects for off-policy preference data.

    Formula:
        w(y) = exp( (1/|y|) · Σ_t [ log π(y_t|x,y_<t) − log Σ_v π(v|x,y_<t)² ] )
        ℓ = sg(min(w(y_c)·w(y_r), 1)) · ℓ_base          (min(·, 1) only when clamp is true)

    Symbols: |y| completion tokens, π the policy, sg stop-gradient, ℓ_base the base variant's loss.
    Convention: the official WPO code (wzhouad/WPO) clamps the weight at 1; TRL 1.16
    (`use_weighting=True`) does not — set ``clamp=False`` for TRL's behaviour. The paper's Llama-3
    recipe uses β = 0.01. Needs per-token statistics (``LogProbs.chosen_logsumsq``).

    Args:
        base: the variant whose per-pair loss is weighted (any registered name).
        beta: β handed to the base variant.
        clamp: clamp the pair weight at 1 (official code) or not (TRL).
    """

    name = "wpo"
    paper = "https://arxiv.org/abs/2406.11827"
    params = {
        "base": Param("dpo", None, "the variant whose per-pair loss is weighted"),
        "beta": Param(0.1, "(0, inf)", "β handed to the base variant"),
        "clamp": Param(True, None, "clamp the pair weight at 1 (official WPO) or not (TRL 1.16)"),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        spec = dpobench.get_losses()[self.base]
        overrides = {"beta": self.beta} if "beta" in spec.cls.params else {}
        self.inner = spec.build(**overrides)
        self.reference_free = self.inner.reference_free
        self.batch_coupled = self.inner.batch_coupled
        self.monotone = self.inner.monotone
        self.inputs = frozenset({"logsumsq"}) | self.inner.inputs

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        if policy.chosen_logsumsq is None or policy.rejected_logsumsq is None:
            raise ValueError(
                "loss 'wpo' needs per-token statistics: LogProbs.chosen_logsumsq and rejected_logsumsq are None"
            )
        with torch.no_grad():
            log_wc = (policy.chosen - policy.chosen_logsumsq) / policy.chosen_tokens.clamp(min=1)
            log_wr = (policy.rejected - policy.rejected_logsumsq) / policy.rejected_tokens.clamp(min=1)
            weight = torch.exp((log_wc + log_wr).float().clamp(max=EXP_MAX))
            if self.clamp:
                weight = weight.clamp(max=1.0)
        out = self.inner(policy, reference, **extras)
        return LossOutput(out.losses * weight, out.chosen_rewards, out.rejected_rewards)


class CombinedLoss(PreferenceLoss):
    """Weighted sum of variants with one shared β (TRL's multi `loss_type`; RPO https://arxiv.org/abs/2404.19733).

    Formula:
        ℓ = Σ_k w_k · ℓ_k        (each ℓ_k built with the shared β)
        rewards = rewards of the first component

    Symbols: w_k the weight of component k, ℓ_k its per-pair loss.
    Convention: TRL 1.16 (`loss_type=[...]`, `loss_weights=[...]`), which reports the rewards β·Δ of
    its reward metric whatever the components; here the rewards of the first component, which is
    the same for every preset shipped (DPO first).

    Args:
        components: ``((name, weight), ...)`` or the string ``"dpo:1,sft:1"``.
        beta: β shared by every component that declares one.
    """

    name = "combined"
    paper = "https://arxiv.org/abs/2404.19733"
    params = {
        "components": Param((("dpo", 1.0), ("sft", 1.0)), None, "(variant, weight) pairs, or 'dpo:1,sft:1'"),
        "beta": Param(0.1, "(0, inf)", "β shared by every component that declares one"),
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.components = _parse_components(self.components)
        self.hparams["components"] = self.components
        registry = dpobench.get_losses()
        parts = []
        for name, _ in self.components:
            spec = registry[name]
            parts.append(spec.build(**({"beta": self.beta} if "beta" in spec.cls.params else {})))
        self.parts = torch.nn.ModuleList(parts)
        self.weights = [w for _, w in self.components]
        self.reference_free = all(p.reference_free for p in parts)
        self.batch_coupled = any(p.batch_coupled for p in parts)
        self.monotone = all(p.monotone for p in parts)
        self.inputs = frozenset().union(*(p.inputs for p in parts))

    def forward(self, policy: LogProbs, reference: LogProbs | None, **extras: Tensor) -> LossOutput:
        total: Tensor | None = None
        first: LossOutput | None = None
        for part, weight in zip(self.parts, self.weights, strict=True):
            out = part(policy, reference, **{k: v for k, v in extras.items() if k in part.inputs})
            first = first or out
            total = weight * out.losses if total is None else total + weight * out.losses
        assert total is not None and first is not None
        return LossOutput(total, first.chosen_rewards, first.rejected_rewards)


def _parse_components(value: Any) -> tuple[tuple[str, float], ...]:
    try:
        if isinstance(value, str):
            items = [item.split(":") for item in value.split(",") if item.strip()]
            parsed = tuple((name.strip(), float(weight)) for name, weight in items)
        else:
            parsed = tuple((str(name), float(weight)) for name, weight in value)
    except (TypeError, ValueError):
        raise ParamError(
            f"loss 'combined': components={value!r} must be (name, weight) pairs or a string like 'dpo:1,sft:1'"
        ) from None
    if not parsed:
        raise ParamError("loss 'combined': components is empty; give at least one 'name:weight'")
    return parsed


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(WeightedPreferenceLoss)
    register(CombinedLoss)
    # RPO (arXiv 2404.19733, "Iterative Reasoning Preference Optimization"): DPO + α·NLL, α = 1.
    register(CombinedLoss, name="rpo", tags=("main",), components=(("dpo", 1.0), ("sft", 1.0)))
    # MPO (arXiv 2411.10442): TRL's recipe loss_type=["sigmoid","bco_pair","sft"], weights [0.8, 0.2, 1.0].
    register(
        CombinedLoss, name="mpo", paper="arXiv:2411.10442", components=(("dpo", 0.8), ("bco_pair", 0.2), ("sft", 1.0))
    )
