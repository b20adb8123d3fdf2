"""Losses for the Ray executor's tests: DPO's numbers, with a cell that finishes late or a worker that dies."""

import os
import signal
import time
from pathlib import Path

import torch.nn.functional as F

import dpobench
from dpobench.losses import implicit_rewards, log_ratios


class SlowDPO(dpobench.PreferenceLoss):
    """DPO, 0.6 s slower a step: submitted first, it finishes last (https://arxiv.org/abs/2305.18290).

    Formula:
        ℓ = −log σ(β·(Δc − Δr))

    Args:
        beta: β.
    """

    name = "slow_dpo"
    paper = "https://arxiv.org/abs/2305.18290"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "β")}

    delay = 0.6

    def forward(self, policy, reference, **extras):
        time.sleep(self.delay)
        dc, dr = log_ratios(policy, reference)
        return dpobench.LossOutput(-F.logsigmoid(self.beta * (dc - dr)), *implicit_rewards(self.beta, dc, dr))


class DiesOnce(SlowDPO):
    """DPO whose first attempt kills its own process, as an OOM kill would (https://arxiv.org/abs/2305.18290).

    Needs DPOBENCH_TEST_MARKERS, a folder: the first attempt leaves its mark there.

    Formula:
        ℓ = −log σ(β·(Δc − Δr))

    Args:
        beta: β.
    """

    name = "dies_once"
    delay = 0.0

    def forward(self, policy, reference, **extras):
        marker = Path(os.environ["DPOBENCH_TEST_MARKERS"]) / self.name
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(policy, reference, **extras)


class AlwaysDies(SlowDPO):
    """DPO whose every attempt kills its own process (https://arxiv.org/abs/2305.18290).

    Formula:
        ℓ = −log σ(β·(Δc − Δr))

    Args:
        beta: β.
    """

    name = "always_dies"
    delay = 0.0

    def forward(self, policy, reference, **extras):
        with (Path(os.environ["DPOBENCH_TEST_MARKERS"]) / self.name).open("a") as attempts:
            attempts.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)


@dpobench.hookimpl
def register_losses(register):
    register(SlowDPO)
    register(DiesOnce)
    register(AlwaysDies)
