"""A correct loose-file plugin loaded beside the broken ones: it must still load."""

import torch.nn.functional as F

import dpobench
from dpobench.losses import implicit_rewards, log_ratios


class SquaredHingeLoss(dpobench.PreferenceLoss):
    """Squared hinge on the DPO margin, after SLiC (https://arxiv.org/abs/2305.10425).

    Formula:
        ℓ = max(0, 1 − β·h)²,    h = Δc − Δr

    Args:
        beta: β, the inverse margin.
    """

    name = "squared_hinge"
    paper = "https://arxiv.org/abs/2305.10425"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "β, the inverse margin")}

    def forward(self, policy, reference, **extras):
        dc, dr = log_ratios(policy, reference)
        return dpobench.LossOutput(F.relu(1 - self.beta * (dc - dr)) ** 2, *implicit_rewards(self.beta, dc, dr))


@dpobench.hookimpl
def register_losses(register):
    register(SquaredHingeLoss)
