"""Judges: what scores a policy's samples as its "gold" reward where the pairs come from the user (``--judge``).

The synthetic task has its own gold reward; pairs from ``--data`` have none, so without a judge a run measures only
implicit rewards. A judge turns the policy's samples on held-out prompts into numbers on one scale for every cell:

- ``vader``: the VADER sentiment analyser's compound score of each completion (``vaderSentiment``), in [−1, 1], the
  scorer of the DPO paper's controlled-sentiment experiment made offline;
- a folder written by ``save_pretrained`` of a ``transformers`` sequence classifier with one output (a reward model):
  its score of prompt + completion.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["JUDGES", "Judge", "JudgeError", "load_judge"]

#: judges known by name (anything else is a reward-model folder)
JUDGES = ("vader",)


class JudgeError(ValueError):
    """A judge that cannot be used; the message names it and says what to give instead."""


@dataclass
class Judge:
    """Scores completions (given their prompts); ``describe`` says which judge made a run's gold reward."""

    name: str
    describe: str
    #: what identifies its scores (a model's weights hash): cells evaluated by another judge are other cells
    key: str
    scorer: Any = field(repr=False)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(v) for v in self.scorer(list(prompts), list(completions))]


def load_judge(spec: str, device: str = "cpu") -> Judge:
    """The judge ``spec`` names: ``vader``, or a reward-model folder. Raises ``JudgeError`` (one line)."""
    if spec == "vader":
        return _vader()
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise JudgeError(f"--judge {spec!r}: neither {' nor '.join(JUDGES)} nor a folder; give vader or a reward "
                         "model saved with save_pretrained (a sequence classifier with one output)")  # fmt: skip
    return _reward_model(folder, device)


def _vader() -> Judge:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise JudgeError(
            "--judge vader: the vaderSentiment package is not installed; pip install 'dpobench[real]'"
        ) from None
    analyser = SentimentIntensityAnalyzer()
    version = importlib.metadata.version("vaderSentiment")
    return Judge("vader", f"VADER compound sentiment of each completion (vaderSentiment {version}; −1…1)",
                 f"vader-{version}", lambda prompts, texts: [analyser.polarity_scores(t)["compound"] for t in texts])  # fmt: skip


def _reward_model(folder: Path, device: str) -> Judge:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from dpobench.models import model_fingerprint

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise JudgeError(f"--judge {folder}: not a model folder ({str(error).splitlines()[0]})") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise JudgeError(f"--judge {folder}: a {', '.join(architectures) or config.model_type} is not a sequence "
                         "classifier; give a reward model (…ForSequenceClassification with one output) or vader")  # fmt: skip
    if config.num_labels != 1:
        raise JudgeError(f"--judge {folder}: a classifier with {config.num_labels} outputs; a reward model has one "
                         "(num_labels=1), whose value is the reward")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(prompts: list[str], texts: list[str], batch: int = 32) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), batch):
            pairs = [
                f"{p} {t}" for p, t in zip(prompts[start : start + batch], texts[start : start + batch], strict=True)
            ]
            encoded = tokenizer(pairs, return_tensors="pt", padding=True, truncation=True).to(device)
            out += model(**encoded).logits[:, 0].float().tolist()
        return out

    key = model_fingerprint(folder)  # its weights' hash, as a model's elsewhere
    return Judge(str(folder), f"reward model {folder} ({architectures[0]}, weights {key})", f"rm-{key}", score)
