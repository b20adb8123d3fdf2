"""Modifiers registered as variants: WPO weighting and weighted combinations (RPO, MPO)."""

from __future__ import annotations

from dpobench import hookimpl
from dpobench.modifiers import CombinedLoss, WeightedPreferenceLoss


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
