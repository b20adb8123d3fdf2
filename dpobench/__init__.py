"""dpobench: measure preference-optimisation losses (DPO and its family) under identical training."""

from __future__ import annotations

from dpobench.hookspecs import hookimpl
from dpobench.losses import LogProbs, LossOutput, Param, ParamError, PreferenceLoss
from dpobench.plugins import get_loss, get_losses, plugin_errors
from dpobench.registry import LossSpec, Study, UnknownLossError

__version__ = "0.1.0"

__all__ = [
    "LogProbs",
    "LossOutput",
    "LossSpec",
    "Param",
    "ParamError",
    "PreferenceLoss",
    "Study",
    "UnknownLossError",
    "__version__",
    "get_loss",
    "get_losses",
    "hookimpl",
    "plugin_errors",
]
