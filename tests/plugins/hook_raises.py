"""Broken on purpose: its register_losses raises after registering one variant."""

import dpobench
from dpobench_plugins.dpo import DPOLoss


@dpobench.hookimpl
def register_losses(register):
    register(DPOLoss, name="half_registered")
    raise ValueError("cannot find my configuration")
