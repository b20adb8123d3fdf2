import torch.nn.functional as F

import dpobench
from dpobench.losses import implicit_rewards, log_ratios


class OffsetDPOLoss(dpobench.PreferenceLoss):
    """DPO with a constant offset, the simplest ODPO (https://arxiv.org/abs/2402.10571).

    Formula:
        ℓ = −logσ(β·(Δc − Δr) − γ)

    Args:
        beta: β, the KL-regularisation strength.
        gamma: γ, the margin the chosen reward must beat the rejected one by.
    """

    name = "offset_dpo"
    paper = "https://arxiv.org/abs/2402.10571"
    params = {
        "beta": dpobench.Param(0.1, "(0, inf)", "KL-regularisation strength"),
        "gamma": dpobench.Param(0.5, "[0, inf)", "required reward margin"),
    }

    def forward(self, policy, reference, **extras):
        dc, dr = log_ratios(policy, reference)
        losses = -F.logsigmoid(self.beta * (dc - dr) - self.gamma)
        return dpobench.LossOutput(losses, *implicit_rewards(self.beta, dc, dr))


@dpobench.hookimpl
def register_losses(register):
    register(OffsetDPOLoss)
