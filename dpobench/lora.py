"""LoRA adapters on the policy, through peft: the one module that imports it.

The adapters are injected into the model in place (``peft.inject_adapter_in_model``), so the policy stays the same
``transformers`` class, and the training step, the fast paths and sampling see no wrapper. Every weight but the
adapters' is frozen; the adapters' second matrix starts at zero, so a cell starts as the base model, which is the
reference.
"""

from __future__ import annotations

from typing import Any

import torch

from dpobench.config import LoraOptions, SweepError

__all__ = ["add_adapters"]


def add_adapters(model: Any, options: LoraOptions, seed: int = 0) -> tuple[int, int]:
    """Inject LoRA adapters into ``model`` (in place) and freeze everything else; their first matrices are drawn
    from ``seed``, so every cell of a sweep starts from the same adapters. Returns (trainable, total) parameters.
    Raises ``SweepError`` (one line) for target modules the model does not have."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = "all-linear" if tuple(options.targets) == ("all-linear",) else list(options.targets)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, target_modules=targets, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")  # fmt: skip
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear)})  # fmt: skip
        raise SweepError(f"--lora-targets {','.join(options.targets)}: {str(error).splitlines()[0]} (its linear "
                         f"modules: {', '.join(names)})") from None  # fmt: skip
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
