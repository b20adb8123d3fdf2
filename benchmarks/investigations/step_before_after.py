"""A DPO training step's time in this process's dpobench, to compare two versions of the code run alternately.

Question: does a change to the harness cost a variant that does not use it anything? (Issue 22: the per-token,
margin and unpaired inputs must cost nothing where no variant in the sweep declares them.)

Each run builds the `tiny` reference model (cached), 512 random pairs of task-like lengths, and times 200 steps of
one variant after 20 warm-up steps; run it alternately with the current checkout and an older one, e.g.

    git worktree add /tmp/old COMMIT && mkdir -p /tmp/oldpp && ln -s /tmp/old/plugins /tmp/oldpp/dpobench_plugins
    python benchmarks/investigations/step_before_after.py dpo
    PYTHONPATH=/tmp/old:/tmp/oldpp python -W ignore benchmarks/investigations/step_before_after.py dpo

(the older tree's plugins that need newer code fail to import, named in a warning; the others load). The results
are in RESULTS.md.
"""

from __future__ import annotations

import copy
import random
import sys
import time

import dpobench
from dpobench.data import Pair, PairSet
from dpobench.logprobs import reference_logprobs
from dpobench.models import SFTRecipe, load_model, reference_model
from dpobench.train import CellTrainer, TrainConfig


def main(variant: str = "dpo", warmup: int = 20, timed: int = 200) -> None:
    policy, tokenizer = load_model(reference_model(SFTRecipe(size="tiny")))
    rng = random.Random(0)
    seq = lambda lo, hi: tuple(rng.randrange(5, len(tokenizer)) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    pairs = [Pair(seq(6, 12), seq(8, 22), seq(8, 22)) for _ in range(512)]
    reference = copy.deepcopy(policy).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    cached = reference_logprobs(reference, pairs, tokenizer.pad_token_id, device="cpu")
    config = TrainConfig(steps=warmup + timed, batch_size=32)
    trainer = CellTrainer(policy, state, dpobench.get_loss(variant), PairSet(pairs), cached, tokenizer.pad_token_id,
                          config, seed=0)  # fmt: skip
    for _ in range(warmup):
        trainer.step()
    start = time.perf_counter()
    for _ in range(timed):
        trainer.step()
    print(f"{variant}: {(time.perf_counter() - start) / timed * 1e3:.2f} ms/step")


if __name__ == "__main__":
    main(*sys.argv[1:2])
