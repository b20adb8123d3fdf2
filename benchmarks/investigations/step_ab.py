"""A/B of single choices of dpobench's training step, in one process, rounds interleaved (A, B, C, A, B, C, …), so
that the shared machine's noise falls on every row alike. Each row is ``CellTrainer.step`` with one field of its
acceleration plan (``dpobench.acceleration.Acceleration``) set otherwise, or the model called otherwise.

    python benchmarks/investigations/step_ab.py --size small --data task --pairs 32 --rounds 12      # CPU
    python benchmarks/investigations/step_ab.py --size base --pairs 32 --rounds 10                   # GPU

Rows:
- ``default``: the step as ``dpobench run`` trains.
- ``prompt shared``: each pair as one row, its prompt through the model once (the CPU's default).
- ``one row per sequence``: chosen and rejected in rows of their own, the prompt in both (CUDA's default).
- ``attention mask``: one row per sequence, and the decoder given the batch's attention mask. The rows are
  right-padded, so causal attention gives real tokens the same result without it; with it, transformers builds an
  (N, 1, T, T) mask for padded batches, SDPA cannot take its causal kernel, and the mask's checks read values back
  from the device.
- ``synced``: the host asks whether the loss is finite before the backward pass (``defer_finite_check=False``).
- ``exact widths``: each batch as wide as its longest row (``pad_multiple=1``); CUDA rounds widths up to a multiple
  of 16, the CPU rounds nothing, so there the row equals ``default``. Use ``--data varied`` or ``task``:
  fixed-length data has one width either way.
- ``eager``: the default step without ``torch.compile`` (CUDA compiles by default; the CPU does not).
- ``eager head``: compiled layers, but the LM head's softmax statistics and gradient computed eagerly
  (``compiled_head=False``). Equals ``default`` where nothing compiles (the CPU, by default).
- ``no CUDA graphs``: compiled layers launched one kernel at a time by the host. Equals ``default`` on the CPU.
- ``small head chunks``: the LM head in chunks of ``LOGITS_BUDGET`` logits (12 chunks at 32 base-size pairs) rather
  than CUDA's ``CUDA_LOGITS_BUDGET`` (3). Equals ``default`` on the CPU.

On varying lengths, a CUDA process pays once for each new batch shape (a cuDNN attention plan, a compiled shape),
and the row that meets a shape first pays for the rows after it: compare ``exact widths`` and ``eager`` there with
``step_speed.py --only``, one process per row (``gpu_check.sh`` does).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.steps import DpobenchStep, add_data_arguments, build_model, load_data, sync
from dpobench.acceleration import LOGITS_BUDGET, SpeedOptions
from dpobench.models import SIZES

ROWS = ("default", "prompt shared", "one row per sequence", "attention mask", "synced", "exact widths", "eager",
        "eager head", "no CUDA graphs", "small head chunks")  # fmt: skip


def with_attention_mask(model, pad_id: int) -> None:
    """The decoder of ``model`` is called with the attention mask of its (right-padded) input."""
    decoder = model.get_decoder()
    forward = decoder.forward

    def masked(input_ids=None, attention_mask=None, **kwargs):
        mask = (input_ids != pad_id).long() if attention_mask is None else attention_mask
        return forward(input_ids=input_ids, attention_mask=mask, **kwargs)

    decoder.forward = masked


def make_row(row: str, model, pairs, batch: int, device: str, pad_id: int, compile) -> DpobenchStep:
    """Row ``row``'s step: the options ``compile`` (--compile) and the row ask, then the plan fields it sets."""
    speed = SpeedOptions(compile=False if row == "eager" else compile,
                         cuda_graphs=False if row == "no CUDA graphs" else None,
                         share_prompt={"prompt shared": True, "one row per sequence": False,
                                       "attention mask": False}.get(row))  # fmt: skip
    plan: dict[str, object] = {}
    if row == "exact widths":
        plan["pad_multiple"] = 1
    if row == "eager head":
        plan["compiled_head"] = False
    if row == "small head chunks":
        plan["head_chunk_tokens"] = LOGITS_BUDGET // model.get_output_embeddings().weight.shape[0]
    if row == "synced":
        plan["defer_finite_check"] = False
    if row == "attention mask":
        with_attention_mask(model, pad_id)
    return DpobenchStep(model, pairs, batch, device, pad_id, speed=speed, **plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=list(SIZES))
    add_data_arguments(parser, "task")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", choices=["default", "on", "off"], default="default")
    args = parser.parse_args()
    compile = {"default": None, "on": True, "off": False}[args.compile]
    pairs, vocab, pad_id = load_data(args, max(4096, 64 * args.pairs))
    base = build_model(args.size, vocab)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown --rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    steps = {r: make_row(r, copy.deepcopy(base), pairs, args.pairs, args.device, pad_id, compile) for r in rows}
    warm: dict[str, float] = {}  # s: the warm-up steps, compilation and graph recording included
    for row, step in steps.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(args.device)
        warm[row] = time.perf_counter() - start
    times: dict[str, list[float]] = {r: [] for r in rows}
    peak: dict[str, float] = dict.fromkeys(rows, 0.0)  # CUDA: the most any one step of the row allocated
    cuda = args.device.startswith("cuda")
    for _ in range(args.rounds):
        for row, step in steps.items():
            sync(args.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step()
            times[row].append(time.perf_counter() - start)
            if cuda:
                peak[row] = max(peak[row], torch.cuda.max_memory_allocated() / 2**30)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.size}, {args.data} data, {args.pairs} pairs/step, {args.rounds} interleaved rounds, {name}, "
          f"torch {torch.__version__}")  # fmt: skip
    reference = statistics.median(times[rows[-1]])
    print(f"| row | median step ms | mean step ms | speed × {rows[-1]} | peak GB (CUDA; with every row's weights) | "
          f"{args.warmup} warm-up steps, s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in rows:
        median, mean = statistics.median(times[row]), statistics.fmean(times[row])
        memory = f"{peak[row]:.2f}" if cuda else "–"
        print(
            f"| {row} | {median * 1e3:.2f} | {mean * 1e3:.2f} | {reference / median:.2f} | {memory} | {warm[row]:.1f} |"
        )


if __name__ == "__main__":
    main()
