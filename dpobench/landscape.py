"""Model-free geometry of every variant: loss, gradient weight and preference probability over a grid
of log-ratio margins × β — the seed notebook's β-sensitivity and loss-landscape studies, for all.

Each grid point is one pair evaluated on its own (a batch of one, so batch-level terms such as the
SFT NLL and AOT's sorting see only that pair). The pair is symmetric around a reference point:

    log π(y_c) = b + h/2,  log π(y_r) = b − h/2,  log π_ref(y_c) = log π_ref(y_r) = b = −tokens

so the log-ratio margin Δc − Δr is h and both responses have ``tokens`` tokens. Reference-free
variants see the same policy log-probs. ``grad_weight`` is −∂ℓ/∂h: how hard the loss pushes the
margin up at that point (DPO: β·σ(−β·h)). ``preference_prob`` is σ(r_c − r_r) with the variant's own
implicit rewards (DPO: σ(β·h)).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from dpobench.losses import LogProbs, PreferenceLoss, call_loss, check_output
from dpobench.registry import LossSpec

__all__ = ["DEFAULT_BETAS", "DEFAULT_MARGINS", "landscape"]

#: the seed notebook's grid, np.logspace(-2, 0, 15)
DEFAULT_BETAS: tuple[float, ...] = tuple(float(b) for b in np.logspace(-2, 0, 15))
#: log-ratio margins in nats
DEFAULT_MARGINS: tuple[float, ...] = tuple(float(m) for m in np.linspace(-20.0, 20.0, 81))

COLUMNS = [
    "variant", "plugin", "version", "reference_free", "beta", "beta_is_default", "margin", "tokens",
    "loss", "grad_weight", "preference_prob",
]  # fmt: skip


def landscape(
    specs: Iterable[LossSpec],
    betas: Sequence[float] = DEFAULT_BETAS,
    margins: Sequence[float] = DEFAULT_MARGINS,
    tokens: int = 20,
) -> pd.DataFrame:
    """A tidy frame, one row per (variant, β, margin). Each variant's default β is added to ``betas``."""
    rows: list[dict[str, object]] = []
    errors: dict[str, str] = {}
    h = torch.tensor(list(margins), dtype=torch.float64)
    for spec in specs:
        default_beta = spec.params["beta"].default if "beta" in spec.params else None
        grid = sorted({*betas, default_beta}) if default_beta is not None else [None]
        evaluated = []
        try:  # a broken plugin is left out (and named in frame.attrs["errors"]), not fatal
            for beta in grid:
                loss = spec.build(**({} if beta is None else {"beta": beta}))
                evaluated.append((beta, loss, *_evaluate(loss, h, tokens)))
        except Exception as error:
            errors[spec.name] = f"{type(error).__name__}: {' '.join(str(error).split())}"
            continue
        for beta, loss, values, grads, probs in evaluated:
            for i, margin in enumerate(h.tolist()):
                rows.append(
                    {
                        "variant": spec.name, "plugin": spec.plugin, "version": spec.version,
                        "reference_free": loss.reference_free, "beta": beta if beta is not None else np.nan,
                        "beta_is_default": beta == default_beta, "margin": margin, "tokens": tokens,
                        "loss": values[i], "grad_weight": grads[i], "preference_prob": probs[i],
                    }
                )  # fmt: skip
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs["errors"] = errors
    return frame


def _evaluate(loss: PreferenceLoss, margins: torch.Tensor, tokens: int) -> tuple[list[float], ...]:
    """Loss, −∂loss/∂margin and σ(reward margin) at each margin: every margin one pair of one batch, or, for a
    variant whose pairs see the rest of the batch (``batch_coupled``: AOT's sorting, TRL's batch-wide NLL), a batch
    of one pair per margin. The contract check (``dpobench check``) holds the others to their pairs' own losses."""
    if loss.batch_coupled:
        columns = [_evaluate_batch(loss, margin[None], tokens) for margin in margins]
        return tuple([value for column in part for value in column] for part in zip(*columns, strict=True))
    return _evaluate_batch(loss, margins, tokens)


def _evaluate_batch(loss: PreferenceLoss, margins: torch.Tensor, tokens: int) -> tuple[list[float], ...]:
    loss.reset()  # a stateful loss (β-DPO) sees each batch as the first of a cell
    n = margins.shape[0]
    base = torch.full((n,), -float(tokens), dtype=torch.float64)
    length = torch.full((n,), float(tokens), dtype=torch.float64)
    reference = LogProbs(base, base, length, length, base, base).with_even_tokens()
    h = margins.detach().clone().requires_grad_(True)
    # log Σ p² = log p here, so WPO's pair weight is exactly 1 and the landscape is its base's; chosen and rejected
    # are equally long, so the per-token losses (LD-DPO, SamPO) see every token and are their base's too. A score
    # margin of 1 makes ODPO's offset α·log 1 = 0; the stand-in sequential KL is the same on both sides
    # (h²/(8·tokens) per completion), so TDPO1's is DPO's too.
    policy = LogProbs(base + h / 2, base - h / 2, length, length, base + h.detach() / 2,
                      base - h.detach() / 2).with_even_tokens().with_token_kl(reference)  # fmt: skip
    ones = torch.ones(n, dtype=torch.float64)
    out = call_loss(loss, policy, reference, weights=ones, margin=ones)
    check_output(out, n)  # as training does: a loss that is not per pair is left out, as `dpobench check` fails it
    (grad,) = torch.autograd.grad(out.losses.sum(), h)
    probs = torch.sigmoid(out.chosen_rewards - out.rejected_rewards)
    return out.losses.detach().tolist(), (-grad).tolist(), probs.tolist()
