"""dpobench: measure preference-optimisation losses (DPO and its family) under identical training.

Where each concern lives, in the order a sweep runs:

- the plugin API: ``hookspecs`` (the one hook), ``losses`` (the loss contract: ``LogProbs``, ``PreferenceLoss``,
  ``Param``, the declarable inputs), ``registry`` (what plugins registered), ``plugins`` (loading them),
  ``testing`` (the conformance checker), ``landscape`` (each loss's model-free geometry);
- configuration: ``config`` (every option and default once; presets, TOML and the command line merged and checked);
- the task and models: ``task`` (the synthetic grammar and its gold reward), ``data`` (pairs and unpaired
  examples: sampled, or read from a file, a dataset folder or the Hub), ``models`` (build, SFT, load, cache; GGUF),
  ``lora`` (peft adapters), ``judges`` (a gold reward for your pairs);
- training: ``sweep`` (plan, prepare, commit each cell), ``cells`` (the cells, the prepared sweep, and the executors
  that run them: in process or side by side; ``ray_executor`` on Ray), ``train`` (the one training loop and the
  evaluation), ``logprobs`` (completion log-probs and the reference cache), ``acceleration`` (how the step runs
  fast), ``stepcost`` (each loss's step cost, measured side by side);
- beyond offline losses: ``methods`` (best-of-N, RLOO, PPO and online training of any paired loss, selected like
  variants), ``reward_model`` (the learned Bradley-Terry reward model they use);
- results: ``store`` (SQLite; the only module that speaks SQL), ``metrics`` (the metric catalogue),
  ``degeneration`` (repetition and diversity of samples), ``tables`` (pandas views), ``verdict`` (which loss: the
  picks and the health rule), ``transfer`` (does a ranking transfer), ``figures`` (matplotlib), ``report`` (HTML
  and PDF);
- ``cli``: the ``dpobench`` command, a thin shell over the above.
"""

from __future__ import annotations

from dpobench.hookspecs import hookimpl
from dpobench.losses import (
    Completions,
    LogProbs,
    LossOutput,
    Param,
    ParamError,
    PreferenceLoss,
    UnpairedLoss,
    UnpairedOutput,
)
from dpobench.plugins import get_loss, get_losses, plugin_errors
from dpobench.registry import LossSpec, Study, UnknownLossError

__version__ = "0.1.0"

__all__ = [
    "Completions",
    "LogProbs",
    "LossOutput",
    "LossSpec",
    "Param",
    "ParamError",
    "PreferenceLoss",
    "Study",
    "UnknownLossError",
    "UnpairedLoss",
    "UnpairedOutput",
    "__version__",
    "get_loss",
    "get_losses",
    "hookimpl",
    "plugin_errors",
]
