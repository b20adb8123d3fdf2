"""The throughput of dpobench's RLOO loop in samples a second, beside TRL's ``RLOOTrainer`` in one process.

Both run on the same model, reward model, prompts and sizes; where ``trl`` is not importable (or with ``--no-trl``),
dpobench runs alone. Written against TRL 1.16.

What both sides do with one batch of samples: ``--batch-size`` prompts of the sweep's training pairs, in dpobench's
seeded order (the same prompts at the same step on both sides), k = 2 completions of each sampled from the policy at
temperature 1 (no top-k, top-p or repetition penalty) up to ``--max-new-tokens`` tokens, stopping when every row has
ended; the policy's and the frozen reference's per-token log-probs of them; the learned reward model's score of each
less β = 0.1 times its KL from the reference (the log-ratio summed over the completion); the leave-one-out baseline;
then ``--epochs`` updates on the whole batch (the clipped probability ratio of whole completions, ε = 0.2), each a
forward, backward, gradient clipping at 1.0 and an AdamW step (fused, no weight decay) at the sweep's learning rate
(linear warm-up over the same batches, then flat). Float32 on the CPU, bf16 autocast on CUDA. The policy is the
sweep's SFT model: dpobench trains its own policy from the reference weights, TRL a fresh copy read from the same
folder (and reads a second copy as its reference). TRL gets a copy of dpobench's reward model, not the object: it
writes the pad id into its config and, with mixed precision, wraps its forward, which would change dpobench's side.
TRL's settings that differ from its defaults to get there: ``num_iterations=--epochs`` (1), ``beta=0.1`` (0.05),
no gradient checkpointing (``activation_checkpointing=False``; TRL's default is on, which recomputes each forward in
the backward: work dpobench does not do), ``bf16`` on CUDA only (on), ``shuffle_dataset=False``,
``max_completion_length=--max-new-tokens`` (512); no evaluation, logging, saving or telemetry.

What one timed step covers (one batch of samples; its samples/s is its 2 × ``--batch-size`` completions over its
time):

- dpobench: the cell's own ``step_time_ms`` (``_OnPolicy.run``): sampling (dpobench's KV-cached loop), both models'
  per-token log-probs, the reward model's scores, the advantages, the ``--epochs`` updates and the scheduler step.
- TRL: ``--epochs`` Trainer steps, each from ``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback`` (CUDA
  synchronised at both ends), summed. The first also samples the batch: ``model.generate``, decoding the completions
  to text, the policy's ("old") and the reference's log-probs, the reward model on the re-tokenized text, the
  advantages and TRL's metrics with their ``.item()`` syncs; every one makes one update (the loss forward through
  TRL's fused LM head, with the entropy it logs, the backward, clipping, fused AdamW, the scheduler, ``zero_grad``).
  Fetching the prompts from the dataloader and Trainer's bookkeeping between steps are not timed.

What still differs, and what it changes:

- TRL's reward model reads the decoded text re-tokenized, without the EOS token; dpobench's reads the sampled ids,
  EOS included. The prompts go to TRL as text with a trailing space where the tokenizer gives the same ids for it
  (the tiny model's word-level one does): TRL joins prompt and completion text as they are, and without the space the
  prompt's last word and the completion's first would become one unknown token. The rewards therefore differ a
  little (what is learned), the work timed does not (one reward-model forward over the same number of rows).
- The samples are not the same (other sampling code, other random streams), so a batch's completions differ in
  length, and a batch's sampling lasts as long as its longest completion. The table shows each side's mean completion
  length: compare samples/s where those are close, or the completion tokens/s beside them.
- TRL shuffles the rows of a batch before each update (their order only), and its scheduler counts updates where
  dpobench's counts batches (the warm-up is set to span the same batches).

Both trainers run in this process, each in a thread of its own that waits between steps (``Held``), and take turns:
``--warmup`` steps each (not counted), then ``--rounds`` rounds of ``--steps`` steps each, the side that goes first
alternating by round, so that the machine's load falls on both alike. Neither restarts between rounds.

    python benchmarks/rl_throughput.py                   # 8 prompts × 2 completions a step, 3 rounds of 5 steps
    python benchmarks/rl_throughput.py --batch-size 32   # the sweep's own batch (64 completions a step)
    python benchmarks/rl_throughput.py --rounds 1 --steps 1 --batch-size 2 --max-new-tokens 8   # does it run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.trl_step import trl_available

SCENARIO = "clean"


class Held:
    """A training loop in a thread of its own that waits after each step, so that two loops take turns in one
    process. ``train()`` trains until it stops; it calls ``after_step()`` after every step and stops after the step
    where that returns True. ``run(n)`` lets ``n`` steps through and returns when they are done; ``close()`` stops
    the loop and returns what ``train()`` returned. Nothing trains before the first ``run``."""

    def __init__(self, name: str, train: Callable[[], Any]) -> None:
        self.name, self.train = name, train
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.left, self.stopping, self.finished = 0, False, False
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        self.go.acquire()
        try:
            if not self.stopping:
                self.result = self.train()
        except BaseException as error:  # handed to the caller's thread
            self.error = error
        finally:
            self.finished = True
            self.done.release()  # never leave run() waiting

    def after_step(self) -> bool:
        self.left -= 1
        if self.left == 0:
            self.done.release()
            self.go.acquire()
        return self.stopping

    def run(self, steps: int) -> None:
        if self.finished:
            raise RuntimeError(f"{self.name} has stopped training") from self.error
        self.left = steps
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed: {self.error}") from self.error
        if self.finished:  # a cell that stopped by itself (diverged) returns, with its reason
            raise RuntimeError(f"{self.name} stopped early: {getattr(self.result, 'error', '') or 'no reason given'}")

    def close(self) -> Any:
        self.stopping = True
        self.go.release()
        self.thread.join()
        return self.result


class _Stop(Exception):
    pass


def prepare_dpobench(args: argparse.Namespace, total_steps: int) -> tuple[Any, Any]:
    """The sweep of one RLOO cell, as ``dpobench run --variants rloo`` prepares it, with the sampling length set."""
    from dpobench.config import load_config
    from dpobench.sweep import plan_sweep, prepare

    config = load_config({"variants": "rloo", "steps": total_steps, "batch_size": args.batch_size,
                          "device": args.device, "model": args.model}, param=[f"rloo.epochs={args.epochs}"])  # fmt: skip
    plan = plan_sweep(config)
    prepared = prepare(plan)
    evaluator = dataclasses.replace(prepared.evaluator, max_new_tokens=args.max_new_tokens)  # what RLOO samples to
    return dataclasses.replace(prepared, evaluator=evaluator), plan.cells[0]


def dpobench_loop(prepared: Any, cell: Any) -> Held:
    """dpobench's RLOO cell (``run_cell``), held after each step; stopped, it ends as interrupted (no evaluation)."""
    from dpobench.cells import run_cell

    def train() -> Any:
        return run_cell(prepared, cell, on_step=lambda done: held.after_step(), should_stop=lambda: held.stopping)

    held = Held("dpobench", train)
    return held


def prompt_texts(tokenizer: Any, prompts: list[tuple[int, ...]]) -> list[str]:
    """Each prompt as text that TRL's tokenizer call turns back into exactly its ids: with a trailing space where
    that holds for every prompt (see the module's docstring), else as decoded; neither holding, an error."""
    decoded = [tokenizer.decode(p) for p in prompts]
    for texts in ([t + " " for t in decoded], decoded):
        if [tuple(ids) for ids in tokenizer(text=texts)["input_ids"]] == prompts:
            return texts
    raise SystemExit("the tokenizer does not give a prompt's ids back from its text: TRL would see other prompts")


def trl_loop(prepared: Any, cell: Any, args: argparse.Namespace, rows: list[str], samples: int, total_steps: int,
             out: str) -> tuple[Held, list[float], list[float]]:  # fmt: skip
    """TRL's ``RLOOTrainer`` as the module's docstring describes it, held after each batch of samples; with the
    seconds of each of its Trainer steps and the mean completion length of each batch of samples, as they come."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from dpobench.models import load_model

    cuda, recipe = prepared.plan.device.startswith("cuda"), prepared.config.train
    k, epochs = cell.hparams["samples"], cell.hparams["epochs"]
    seconds: list[float] = []
    lengths: list[float] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Quiet(RLOOTrainer):
        def _send_telemetry(self) -> None:
            pass  # TRL pings the Hub from a thread when a trainer is made; a benchmark sends nothing

        def _generate(self, prompts: list) -> tuple:  # type: ignore[override]
            prompt_ids, completion_ids, completions = super()._generate(prompts)
            lengths.append(sum(map(len, completion_ids)) / len(completion_ids))
            return prompt_ids, completion_ids, completions

    class Clock(TrainerCallback):
        start = 0.0

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            sync()
            seconds.append(time.perf_counter() - self.start)
            if state.global_step % epochs == 0 and held.after_step():  # a batch of samples is `epochs` steps
                raise _Stop

    # TRL 1.16 reads the old name on every generation; transformers 5.2x warns about it, once, mid-measurement
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    policy, tokenizer = load_model(prepared.reference.name_or_path, device=prepared.plan.device)
    # transformers 5.2x renamed gradient checkpointing and warns at TRL's default for the old name unless the new is set
    fields = {f.name for f in dataclasses.fields(RLOOConfig)}
    no_checkpointing = {
        "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": False
    }
    config = RLOOConfig(
        output_dir=out, per_device_train_batch_size=samples, gradient_accumulation_steps=1, num_generations=k,
        num_iterations=epochs, max_completion_length=args.max_new_tokens, temperature=1.0, beta=cell.hparams["beta"],
        epsilon=cell.hparams["clip"], shuffle_dataset=False, seed=cell.seed, max_steps=(total_steps + 1) * epochs,
        learning_rate=recipe.lr, weight_decay=0.0, max_grad_norm=recipe.max_grad_norm,
        lr_scheduler_type="constant_with_warmup", warmup_steps=recipe.warmup_steps * epochs,
        **no_checkpointing, bf16=prepared.acceleration.autocast, fp16=False, use_cpu=not cuda,
        dataloader_num_workers=0, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = Quiet(
        model=policy, reward_funcs=copy.deepcopy(prepared.reward_models[SCENARIO].model), args=config,
        train_dataset=Dataset.from_dict({"prompt": rows}), processing_class=tokenizer,
        reward_processing_classes=tokenizer, callbacks=[Clock()],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer prints its end-of-training summary

    def train() -> None:
        try:
            trainer.train()
        except _Stop:
            pass

    held = Held("TRL", train)
    return held, seconds, lengths


def summary(name: str, seconds: list[float], tokens: list[float], args: argparse.Namespace, samples: int,
            epochs: int) -> dict[str, Any]:  # fmt: skip
    """One side's row from the seconds and the mean completion length of each timed step, in the order run."""
    rates = [samples / s for s in seconds]
    return {"name": name, "samples": samples, "epochs": epochs, "steps": len(rates),
            "rounds": [rates[r * args.steps : (r + 1) * args.steps] for r in range(args.rounds)],
            "median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "length": statistics.fmean(tokens),
            "tokens_per_s": statistics.median(r * n for r, n in zip(rates, tokens, strict=True))}  # fmt: skip


def main() -> None:
    from dpobench.methods import RLOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="prompts a step (each sampled k = 2 times)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the longest completion sampled")
    parser.add_argument("--epochs", type=int, default=RLOO.params["epochs"].default,
                        help="updates on each batch of samples: dpobench's RLOO epochs, TRL's num_iterations")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each side a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="steps of each side before the rounds, not counted")
    parser.add_argument("--model", default="tiny", help="as dpobench run --model (a size, or a local folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL out even where it is importable")
    args = parser.parse_args()

    import torch
    import transformers

    import dpobench
    from dpobench.train import batch_order

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars for every copy of the model
    with_trl = trl_available() and not args.no_trl
    if not trl_available():
        print("TRL is not installed (pip install trl): timing dpobench alone")
    total = args.warmup + args.rounds * args.steps
    prepared, cell = prepare_dpobench(args, total + 1)  # a step to spare: a cell that reaches its last evaluates
    k, epochs = cell.hparams["samples"], cell.hparams["epochs"]
    prompts = [pair.prompt for pair in prepared.trains[SCENARIO].pairs]
    per_step = max(1, 2 * args.batch_size // k)  # the prompts of one dpobench step (``_OnPolicy.run``)
    samples = per_step * k

    versions = f"dpobench {dpobench.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
    if with_trl:
        import trl

        versions += f", trl {trl.__version__}"
    device = prepared.plan.device
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    parameters = sum(p.numel() for p in prepared.policy.parameters()) / 1e6
    trl_steps = f" (TRL: num_iterations = {epochs}, {epochs} Trainer steps summed as one step)" if with_trl else ""
    print(f"{versions}; {where}")
    print(f"model {args.model} ({parameters:.2f} M parameters); each step {per_step} prompts × k = {k} = {samples} "
          f"completions of at most {args.max_new_tokens} tokens, β = {cell.hparams['beta']:g}, {epochs} updates on "
          f"them{trl_steps}; {args.warmup} warm-up step(s), then {args.rounds} rounds of {args.steps} steps"
          f"{', interleaved' if with_trl else ''}", flush=True)  # fmt: skip

    loops = {"dpobench": dpobench_loop(prepared, cell)}
    with tempfile.TemporaryDirectory(prefix="rl_throughput_") as out:
        if with_trl:
            order = batch_order(len(prompts), total + 1, per_step, cell.seed)  # dpobench's, as ``_OnPolicy.run``'s
            texts = prompt_texts(prepared.tokenizer, prompts)
            rows = [texts[i] for batch in order for i in batch.tolist()]
            loops["TRL"], trl_seconds, trl_lengths = trl_loop(prepared, cell, args, rows, samples, total, out)
        try:
            for loop in loops.values():
                loop.run(args.warmup)
            for round_ in range(args.rounds):
                names = list(loops) if round_ % 2 == 0 else list(reversed(loops))
                for name in names:
                    loops[name].run(args.steps)
                print(f"round {round_ + 1} of {args.rounds} done", flush=True)
        finally:
            results = {name: loop.close() for name, loop in loops.items()}

    timed = results["dpobench"].steps[args.warmup : total]
    table = [summary("dpobench RLOO", [s["step_time_ms"] / 1e3 for s in timed],
                     [s["tokens_per_s"] * s["step_time_ms"] / 1e3 / samples for s in timed], args, samples, epochs)]  # fmt: skip
    if with_trl:
        per_batch = [sum(trl_seconds[i : i + epochs]) for i in range(0, total * epochs, epochs)]
        table.append(summary("TRL RLOOTrainer", per_batch[args.warmup :], trl_lengths[args.warmup : total], args,
                             samples, epochs))  # fmt: skip

    print("\n| implementation | samples/step | updates/step | completion tokens/sample | samples/s median | min | max "
          "| completion tokens/s | steps |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['name']} | {r['samples']} | {r['epochs']} | {r['length']:.1f} | {r['median']:.2f} | "
              f"{r['min']:.2f} | {r['max']:.2f} | {r['tokens_per_s']:.0f} | {r['steps']} |")  # fmt: skip
    if with_trl:
        mine, theirs = table
        by_round = [statistics.median(a) / statistics.median(b) for a, b in zip(mine["rounds"], theirs["rounds"],
                                                                               strict=True)]  # fmt: skip
        print(
            f"\na step: dpobench's step_time_ms; TRL's {epochs} Trainer steps (on_step_begin to on_step_end) summed, "
            "the batch sampled in the first; what else differs: the module's docstring"
        )
        print(f"dpobench / TRL, samples/s: {mine['median'] / theirs['median']:.2f}× (medians); round by round "
              f"median {statistics.median(by_round):.2f}× (min {min(by_round):.2f}, max {max(by_round):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
