"""The whole public extension surface of dpobench: one hook, ``register_losses``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    from dpobench.registry import RegisterLoss

hookspec = HookspecMarker("dpobench")
hookimpl = HookimplMarker("dpobench")


@hookspec
def register_losses(register: RegisterLoss) -> None:
    """Register preference-loss variants.

    Call ``register(LossClass)`` once per variant. To register a preset of an existing
    class under another name with other defaults, pass the name and keyword overrides:
    ``register(DPOLoss, name="cdpo", label_smoothing=0.1)``. A preset from another paper than its class's names
    it: ``register(DPOLoss, name="fdpo_js", paper="arXiv:2309.16240", f_divergence="js_divergence")``.
    """
