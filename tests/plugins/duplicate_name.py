"""Broken on purpose: registers the name `dpo`, which the built-in plugin `dpo` owns."""

from dpobench_plugins.dpo import DPOLoss

import dpobench


@dpobench.hookimpl
def register_losses(register):
    register(DPOLoss, name="dpo", beta=0.5)
