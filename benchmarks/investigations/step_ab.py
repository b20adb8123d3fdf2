"""A/B of single changes to dpobench's training step, in one process, rounds interleaved (A, B, C, A, B, C, …), so
that the shared machine's noise falls on every row alike. Each row is ``CellTrainer.step`` with one part switched
back to what it was before 2026-11-27 (third session); "as before" switches all four back. Two other changes of
that day cannot be switched back here: completion positions selected by host-built indices rather than a boolean
mask (a sync on CUDA once the forward pass is queued), and per-pair inputs gathered on the device rather than
copied over each step (a blocking copy).

    python benchmarks/step_ab.py --size small --data task --pairs 32 --rounds 12      # CPU
    python benchmarks/step_ab.py --size base --pairs 32 --rounds 10                   # GPU (compiled, as by default)

Rows:
- ``default``: the step as ``dpobench run`` trains.
- ``prompt shared``: each pair as one row, its prompt through the model once (the CPU's default; on CUDA, 0.95x on an
  H200 without CUDA graphs, 1.13x with them in one non-interleaved measurement).
- ``one row per sequence``: chosen and rejected in rows of their own, the prompt in both (the default before on the
  CPU, and still on CUDA), instead of one row per pair with its prompt once.
- ``attention mask``: one row per sequence, and the decoder gets the batch's attention mask, as before. The rows are
  right-padded, so causal attention gives real tokens the same result without it; with it, transformers builds an
  (N, 1, T, T) mask for padded batches, SDPA cannot take its causal kernel, and the mask's checks read values back
  from the device.
- ``per-tensor AdamW``: torch's AdamW without ``fused`` (the CPU's optimizer before; CUDA's was fused already).
- ``synced``: the host asks whether the loss is finite before the backward pass (``defer_finite_check=False``).
- ``as before``: one row per sequence, the attention mask, a per-tensor AdamW (CPU) and the sync.
- ``exact widths``: each batch as wide as its longest row, not rounded up to a multiple of 16 as on CUDA since
  2026-11-27 (third GPU session); the CPU rounds nothing, so there the row equals ``default``. Use ``--data varied``
  or ``task``: fixed-length data has one width either way.
- ``eager``: the default step without ``torch.compile`` (CUDA compiles by default; the CPU does not).
- ``eager head``: compiled layers, but the LM head's softmax statistics and gradient computed eagerly, as before
  2026-11-27 (third GPU session). Equals ``default`` where nothing compiles (the CPU, by default).
- ``no CUDA graphs``: compiled layers launched one kernel at a time by the host, as before 2026-11-27 (fourth GPU
  session), when CUDA graphs became CUDA's default. Equals ``default`` on the CPU.
- ``one layer per region``, ``two layers per region``, ``five layers per region``: the compiled decoder in regions
  of that many layers (with CUDA graphs, one graph to replay per region and pass). The default is one
  (``CUDA_GRAPH_LAYERS_PER_REGION``): 3 and 5 were measured within noise of it on an H200. Where nothing compiles (the
  CPU, by default), they equal ``default``; ``--compile on`` compiles them.
- ``small head chunks``: the LM head in chunks of ``LOGITS_BUDGET`` logits (12 chunks at 32 base-size pairs) rather
  than CUDA's ``CUDA_LOGITS_BUDGET`` (3), as before 2026-11-27 (fifth GPU session). Equals ``default`` on the CPU.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.steps import DpobenchStep, add_data_arguments, build_model, load_data, sync
from dpobench.logprobs import LOGITS_BUDGET
from dpobench.models import SIZES
from dpobench.train import _compiled_layers, layers_per_region

ROWS = ("default", "prompt shared", "one row per sequence", "attention mask", "per-tensor AdamW", "synced", "as before",
        "exact widths", "eager", "eager head", "no CUDA graphs", "one layer per region", "two layers per region",
        "five layers per region", "small head chunks")  # fmt: skip
REGION_ROWS = {"one layer per region": 1, "two layers per region": 2, "five layers per region": 5}


def with_attention_mask(model, pad_id: int) -> None:
    """The decoder of ``model`` is called with the attention mask of its (right-padded) input, as before."""
    decoder = model.get_decoder()
    forward = decoder.forward

    def masked(input_ids=None, attention_mask=None, **kwargs):
        mask = (input_ids != pad_id).long() if attention_mask is None else attention_mask
        return forward(input_ids=input_ids, attention_mask=mask, **kwargs)

    decoder.forward = masked


def make_row(row: str, model, pairs, batch: int, device: str, pad_id: int, compile) -> DpobenchStep:
    step = DpobenchStep(model, pairs, batch, device, pad_id, compile=False if row == "eager" else compile,
                        cuda_graphs=False if row == "no CUDA graphs" else None)  # fmt: skip
    trainer = step.trainer
    if row == "exact widths":
        trainer.pad_multiple = 1
    if row == "eager head":
        trainer.compile_head = False
    if row in REGION_ROWS and trainer.compiled:
        mode = "reduce-overhead" if trainer.cudagraphs else True
        trainer.layers_per_region = layers_per_region(model, most=REGION_ROWS[row])
        trainer.compiled = _compiled_layers(model, mode, trainer.auto_compile, trainer.layers_per_region)
    if row == "small head chunks":
        trainer.head_chunk_tokens = LOGITS_BUDGET // model.get_output_embeddings().weight.shape[0]
    if row in ("per-tensor AdamW", "as before") and device == "cpu":
        lr, warmup = trainer.config.lr, trainer.schedule.lr_lambdas[0]  # the trainer's own warm-up
        trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=False, foreach=False)
        trainer.schedule = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, warmup)
    if row == "prompt shared":
        trainer.share_prompt = True
    if row in ("one row per sequence", "attention mask", "as before"):
        trainer.share_prompt = False
    if row in ("attention mask", "as before"):
        with_attention_mask(model, pad_id)
    if row in ("synced", "as before"):
        trainer.defer_finite_check = False
    return step


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
