"""The correctness and speed baseline for loss kernels: DPO written the plain way, in one place.

Imported by the benchmarks (never copied), so every loss-kernel timing is a ratio against this
function measured in the same process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float = 0.1):
    """−logσ(β·((pc − rc) − (pr − rr))) per pair and the two implicit rewards, as in the DPO paper's code."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()
