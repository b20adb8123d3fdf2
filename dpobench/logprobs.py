"""Completion log-probs of a causal LM, and the reference cache shared by every cell of a sweep.

Chosen and rejected go through one concatenated forward. The LM head is applied only at completion
positions, in chunks, so no (B, T, V) float32 log-softmax is ever held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpobench._util import atomic_path
from dpobench.data import Pair

__all__ = ["Batch", "collate", "reference_logprobs", "sequence_logprobs"]


@dataclass
class Batch:
    input_ids: Tensor  # (N, T), rows = [chosen_1..B, rejected_1..B] for pairs
    attention_mask: Tensor  # (N, T)
    target_mask: Tensor  # (N, T−1) bool: position t predicts a completion token at t+1
    tokens: Tensor  # (N,) completion tokens per row

    def to(self, device: str | torch.device) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.target_mask, self.tokens)
            )
        )

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> Batch:
    """(prompt, completion) rows, right-padded into one batch."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor([*p, *c])
        attention[i, :n] = 1
        target[i, len(p) - 1 : n - 1] = True
    return Batch(ids, attention, target, torch.tensor([len(c) for _, c in rows], dtype=torch.float32))


def pair_rows(pairs: Sequence[Pair]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]


def _head_only_path(model: Any) -> bool:
    config = model.config
    return not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier"))


def sequence_logprobs(
    model: Any, batch: Batch, *, logsumsq: bool = False, chunk_tokens: int = 8192, decoder: Any = None
) -> tuple[Tensor, Tensor | None]:
    """Σ_t log π(y_t | x, y_<t) over completion tokens per row, float32; optionally Σ_t log Σ_v π(v)².

    ``decoder`` replaces ``model.get_decoder()`` (a ``torch.compile``d one, say)."""
    targets = batch.input_ids[:, 1:][batch.target_mask]
    rows = torch.nonzero(batch.target_mask, as_tuple=True)[0]
    if _head_only_path(model):
        hidden = (decoder if decoder is not None else model.get_decoder())(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        selected = hidden[:, :-1][batch.target_mask]
        head = model.get_output_embeddings()
    else:  # models that transform their logits: take them whole
        selected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][
            batch.target_mask
        ]
        head = None
    sums = torch.zeros(batch.size, dtype=torch.float32, device=selected.device)
    lss = torch.zeros(batch.size, dtype=torch.float32, device=selected.device) if logsumsq else None
    for start in range(0, selected.shape[0], chunk_tokens):
        part = selected[start : start + chunk_tokens]
        logits = (head(part) if head is not None else part).float()
        token_logp = -F.cross_entropy(logits, targets[start : start + chunk_tokens], reduction="none")
        sums = sums.index_add(0, rows[start : start + chunk_tokens], token_logp)
        if lss is not None:
            with torch.no_grad():  # WPO's statistic is a constant weight: no gradient through it
                value = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
                lss.index_add_(0, rows[start : start + chunk_tokens], value)
    return sums, lss


@torch.no_grad()
def rows_logprobs(
    model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, *, device: str,
    batch_size: int = 128, autocast: bool = False,
) -> Tensor:  # fmt: skip
    """Completion log-probs of (prompt, completion) rows, without gradients, on the CPU, float32."""
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out.append(sequence_logprobs(model, batch)[0].cpu())
    return torch.cat(out)


def reference_logprobs(
    model: Any, pairs: Sequence[Pair], pad_id: int, *, device: str, batch_size: int = 64, autocast: bool = False
) -> tuple[Tensor, Tensor]:
    """Reference (chosen, rejected) log-probs of every pair, on the CPU, float32."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):  # one batch holds a chunk's chosen and rejected rows
        part = pairs[start : start + batch_size]
        sums = rows_logprobs(model, pair_rows(part), pad_id, device=device, batch_size=2 * len(part), autocast=autocast)
        chosen.append(sums[: len(part)])
        rejected.append(sums[len(part) :])
    return torch.cat(chosen), torch.cat(rejected)


def cached_reference_logprobs(
    model: Any, pairs: Sequence[Pair], pad_id: int, key: str, cache_dir: Path, *, device: str, autocast: bool
) -> tuple[Tensor, Tensor]:
    """``reference_logprobs``, computed once per (model, data, precision) and kept as safetensors."""
    from safetensors.torch import load_file, save_file

    name = hashlib.sha256(f"{key}|{autocast}|{len(pairs)}".encode()).hexdigest()[:20]
    path = cache_dir / "reference" / f"{name}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            if stored["chosen"].shape == (len(pairs),):
                return stored["chosen"], stored["rejected"]
        except Exception:  # a corrupted entry is rebuilt, not trusted
            pass
    chosen, rejected = reference_logprobs(model, pairs, pad_id, device=device, autocast=autocast)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp))
    return chosen, rejected
