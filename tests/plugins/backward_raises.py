"""Broken on purpose: edits in place a tensor that autograd saved, so the loss's backward pass raises."""

import torch.nn.functional as F

import dpobench
from dpobench.losses import log_ratios


class BackwardRaisesLoss(dpobench.PreferenceLoss):
    """In-place DPO: broken on purpose (https://arxiv.org/abs/2305.18290).

    Formula:
        ℓ = softplus(−β·h), its input then scaled in place

    Args:
        beta: β.
    """

    name = "backward_raises"
    paper = "https://arxiv.org/abs/2305.18290"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "β")}

    def forward(self, policy, reference, **extras):
        dc, dr = log_ratios(policy, reference)
        m = -self.beta * (dc - dr)
        losses = F.softplus(m)
        m.mul_(1.0)  # softplus's backward needs its input: this edit makes the backward pass raise
        return dpobench.LossOutput(losses, (self.beta * dc).detach(), (self.beta * dr).detach())


@dpobench.hookimpl
def register_losses(register):
    register(BackwardRaisesLoss)
