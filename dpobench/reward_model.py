"""The learned reward model of the RLHF methods (``dpobench.methods``): the reference model with a scalar head,
trained on the sweep's training pairs with the Bradley-Terry loss, and cached like the SFT model.

Its score of a completion is the head's value at the completion's last token. It is judged two ways before any RL
cell trusts it: how often it prefers the chosen completion of a held-out pair (``heldout_accuracy``), and how well
its scores rank the held-out completions as the gold reward does (``gold_agreement``, Spearman's ρ; NaN where the
pairs have no gold). A model at or below ``LEARNED_ABOVE`` held-out accuracy did not learn the preferences: the
sweep reports it and marks its RL cells instead of training them.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dpobench._util import atomic_path
from dpobench.data import Pair, PairSet
from dpobench.logprobs import collate, pair_rows

__all__ = ["LEARNED_ABOVE", "RewardModel", "RewardRecipe", "bradley_terry_loss", "cached_reward_model"]

#: a reward model whose held-out accuracy is at or below this has not learned the preferences (chance is 0.5)
LEARNED_ABOVE = 0.55


@dataclass(frozen=True)
class RewardRecipe:
    """What determines the reward model besides the reference model and the pairs; its hash keys the cache."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 10
    seed: int = 0
    format: int = 1  # bump when the training code changes what it produces


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r(x, y_w) − r(x, y_l)), averaged: the negative log-likelihood of the labels under Bradley-Terry."""
    return -F.logsigmoid(chosen - rejected).mean()


@dataclass
class RewardModel:
    """A sequence classifier with one output over the reference model's backbone, and how well it learned."""

    model: Any
    pad_id: int
    device: str
    #: ``heldout_accuracy``, ``gold_agreement``, ``train_loss``, ``train_seconds``, ``pairs``, ``folder``
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def learned(self) -> bool:
        return self.info["heldout_accuracy"] > LEARNED_ABOVE

    def scores(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> torch.Tensor:
        """The model's value of each (prompt, completion) row, with gradient where the model has one: (rows,)."""
        batch = collate(rows, self.pad_id)
        return last_token_values(self.model, batch.input_ids.to(self.device), batch.attention_mask.to(self.device))

    @torch.no_grad()
    def score(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 256) -> torch.Tensor:
        """``scores`` without gradient, in batches, on the CPU."""
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [self.scores(rows[i : i + batch_size]).float().cpu() for i in range(0, len(rows), batch_size)]
        finally:
            self.model.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0)


def token_values(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position: (rows, width). A critic (PPO's value model) reads it per token."""
    hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                                      use_cache=False).last_hidden_state  # fmt: skip
    return model.score(hidden).squeeze(-1).float()


def last_token_values(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at each right-padded row's last real token: (rows,)."""
    last = attention_mask.sum(-1) - 1
    return token_values(model, input_ids, attention_mask).gather(1, last[:, None]).squeeze(1)


def build_reward_model(model_path: str | Path, seed: int, device: str) -> Any:
    """The reference model's weights under a new scalar head (``…ForSequenceClassification``, one output), the head
    drawn from ``seed``."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    return model.to(device)


def train_reward_model(
    model: Any, pad_id: int, train: PairSet, heldout: PairSet, recipe: RewardRecipe, device: str
) -> RewardModel:
    """Bradley-Terry training on ``train`` (every pair ``epochs`` times, in a seeded order), then the held-out
    accuracy and gold agreement."""
    from dpobench.train import batch_order

    pairs = train.pairs
    steps = max(1, recipe.epochs * len(pairs) // recipe.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, recipe.warmup_steps)))
    reward_model = RewardModel(model, pad_id, device)
    model.train()
    start, losses = time.perf_counter(), []
    for index in batch_order(len(pairs), steps, recipe.batch_size, recipe.seed):
        batch = [pairs[i] for i in index.tolist()]
        values = reward_model.scores(pair_rows(batch))
        loss = bradley_terry_loss(values[: len(batch)], values[len(batch) :])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    reward_model.info = {**judged(reward_model, heldout.pairs), "train_loss": sum(tail) / len(tail),
                         "train_seconds": time.perf_counter() - start, "pairs": len(pairs), "steps": steps}  # fmt: skip
    return reward_model


def judged(reward_model: RewardModel, heldout: Sequence[Pair]) -> dict[str, float]:
    """How often the model prefers a held-out pair's chosen completion, and Spearman's ρ between its scores and the
    gold rewards of the held-out completions (NaN without gold)."""
    if not heldout:
        return {"heldout_accuracy": math.nan, "gold_agreement": math.nan}
    values = reward_model.score(pair_rows(heldout))
    n = len(heldout)
    gold = torch.tensor([p.chosen_gold for p in heldout] + [p.rejected_gold for p in heldout], dtype=torch.float64)
    agreement = spearman(values.double(), gold) if not gold.isnan().any() else math.nan
    return {"heldout_accuracy": float((values[:n] > values[n:]).float().mean()), "gold_agreement": agreement}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation, ties given their mean rank."""
    return float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.argsort(stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    for value in values.unique():  # ties share the mean of their ranks
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def cached_reward_model(
    model_path: str | Path, pad_id: int, train: PairSet, heldout: PairSet, recipe: RewardRecipe, *, key: str,
    cache_dir: Path, device: str, progress: Callable[[str], None] = lambda message: None,
) -> RewardModel:  # fmt: skip
    """The reward model of (reference model ``key``, these pairs, ``recipe``), trained now if the cache lacks it and
    kept in ``cache_dir/reward_models`` with ``save_pretrained``. An entry that
    cannot be read is trained anew."""
    from transformers import AutoModelForSequenceClassification

    identity = json.dumps([key, train.fingerprint(), heldout.fingerprint(), asdict(recipe)], sort_keys=True)
    folder = cache_dir / "reward_models" / hashlib.sha256(identity.encode()).hexdigest()[:16]
    try:
        info = json.loads((folder / "reward.json").read_text())
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        return RewardModel(model, pad_id, device, {**info, "folder": str(folder)})
    except (OSError, ValueError, KeyError):
        shutil.rmtree(folder, ignore_errors=True)  # missing, or unreadable: trained anew, not trusted
    progress(f"training the reward model on {len(train.pairs)} pairs ({recipe.epochs} epochs); cached for later runs")
    reward_model = train_reward_model(build_reward_model(model_path, recipe.seed, device), pad_id, train, heldout,
                                      recipe, device)  # fmt: skip
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder) as tmp:
        reward_model.model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "reward.json").write_text(json.dumps(reward_model.info, indent=1))
    reward_model.info["folder"] = str(folder)
    return reward_model
