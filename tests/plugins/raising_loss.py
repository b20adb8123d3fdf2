"""Broken on purpose: the loss raises when called."""

import dpobench


class RaisingLoss(dpobench.PreferenceLoss):
    """Raising: broken on purpose (https://arxiv.org/abs/2305.18290).

    Formula:
        ℓ = raise

    Args:
        beta: unused.
    """

    name = "raising_loss"
    paper = "https://arxiv.org/abs/2305.18290"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "unused")}

    def forward(self, policy, reference, **extras):
        raise RuntimeError("this loss is broken on purpose")


@dpobench.hookimpl
def register_losses(register):
    register(RaisingLoss)
