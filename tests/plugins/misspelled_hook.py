"""Broken on purpose: the hook is spelled `register_loss` (dpobench's is `register_losses`)."""

import dpobench


@dpobench.hookimpl
def register_loss(register):
    raise AssertionError("never called")
