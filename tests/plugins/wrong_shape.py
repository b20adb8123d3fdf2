"""Broken on purpose: returns the batch mean instead of per-pair losses."""

import torch.nn.functional as F

import dpobench
from dpobench.losses import log_ratios


class MeanDPOLoss(dpobench.PreferenceLoss):
    """Mean DPO: broken on purpose (https://arxiv.org/abs/2305.18290).

    Formula:
        ℓ = mean_B(−logσ(β·h))

    Args:
        beta: β.
    """

    name = "wrong_shape"
    paper = "https://arxiv.org/abs/2305.18290"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "β")}

    def forward(self, policy, reference, **extras):
        dc, dr = log_ratios(policy, reference)
        losses = -F.logsigmoid(self.beta * (dc - dr)).mean()
        return dpobench.LossOutput(losses, (self.beta * dc).detach(), (self.beta * dr).detach())


@dpobench.hookimpl
def register_losses(register):
    register(MeanDPOLoss)
