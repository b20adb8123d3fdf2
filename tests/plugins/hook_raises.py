"""Broken on purpose: its register_losses raises after registering one variant."""

from dpobench_plugins.dpo import DPOLoss

import dpobench


@dpobench.hookimpl
def register_losses(register):
    register(DPOLoss, name="half_registered")
    raise ValueError("cannot find my configuration")
