"""Broken on purpose: log(sigmoid) instead of logsigmoid, which underflows to NaN/inf, and a 0/0."""

import torch

import dpobench
from dpobench.losses import log_ratios


class NaNLoss(dpobench.PreferenceLoss):
    """NaN DPO: broken on purpose (https://arxiv.org/abs/2305.18290).

    Formula:
        ℓ = −log(σ(β·h)) · (h − h)/(h − h)

    Args:
        beta: β.
    """

    name = "nan_loss"
    paper = "https://arxiv.org/abs/2305.18290"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "β")}

    def forward(self, policy, reference, **extras):
        dc, dr = log_ratios(policy, reference)
        h = dc - dr
        losses = -torch.log(torch.sigmoid(self.beta * h)) * (h - h) / (h - h)
        return dpobench.LossOutput(losses, (self.beta * dc).detach(), (self.beta * dr).detach())


@dpobench.hookimpl
def register_losses(register):
    register(NaNLoss)
