"""One training step of each implementation, as a callable, for the step benchmarks (script and pytest-benchmark).

- ``DpobenchStep``: ``dpobench.train.CellTrainer.step`` itself, the step every cell of a sweep runs: reference
  log-probs cached before training (their values do not change a step's cost: zeros stand in), the fused
  completion-only LM head, length-bucketed batches, fused AdamW and bf16 autocast on CUDA, and the acceleration plan
  ``dpobench run`` would choose (``plan_acceleration``) for the ``SpeedOptions`` given, with any of its fields set
  by hand (``dataclasses.replace``) to compare one choice against another.
- ``PlainStep``: ``baseline.plain_dpo_step`` (reference forward every step, full float32 log-softmax, default
  AdamW) on random batches, padded the same way.
- TRL's ``DPOTrainer``: see ``trl_step.py`` (used only where ``trl`` is importable).

Every callable runs one optimizer step per call, synchronises CUDA before returning, and reads no clock itself.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch

import dpobench
from dpobench.acceleration import SpeedOptions, plan_acceleration
from dpobench.data import Pair, PairSet
from dpobench.logprobs import ReferenceLogps, collate, pair_rows
from dpobench.models import SIZES
from dpobench.train import CellTrainer, TrainConfig

from .baseline import plain_dpo_step


def build_model(size: str, vocab: int, device: str = "cpu", seed: int = 0) -> Any:
    """A randomly initialised Llama of a dpobench size (tied embeddings) with ``vocab`` entries."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
                         **SIZES[size])  # fmt: skip
    return LlamaForCausalLM(config).to(device)


def random_pairs(n: int, prompt: int, completion: int, vocab: int, seed: int = 0, varied: bool = False) -> list[Pair]:
    """Random-token pairs of ``prompt`` + ``completion`` tokens, so nothing is padded (the issue's 256 + 127-token GPU
    workload); ``varied``: prompts of prompt/2 to prompt tokens and each completion of completion/2 to completion
    tokens, so batches vary in width and carry padding, as real data does."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: tuple(torch.randint(1, vocab, (k,), generator=g).tolist())  # noqa: E731
    length = (lambda k: int(torch.randint(k // 2, k + 1, (), generator=g))) if varied else (lambda k: k)
    return [Pair(rand(length(prompt)), rand(length(completion)), rand(length(completion))) for _ in range(n)]


def task_pairs() -> tuple[list[Pair], int, int]:
    """The synthetic task's training pairs (the default run's: 1980 pairs, varying lengths), vocab size, pad id.

    Builds (or reads from the cache) the tiny SFT reference model that samples them."""
    from dpobench.data import DataRecipe, make_task_data
    from dpobench.models import SFTRecipe, load_model, reference_model

    model, tokenizer = load_model(reference_model(SFTRecipe()))
    data = make_task_data(model, tokenizer, DataRecipe())
    return data.train.pairs, len(tokenizer), tokenizer.pad_token_id


def add_data_arguments(parser: Any, default: str) -> None:
    """The data options the step scripts share (see ``load_data``)."""
    parser.add_argument("--data", default=default, choices=["fixed", "varied", "task"])
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary of --data fixed or varied")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=127)


def load_data(args: Any, n: int) -> tuple[list[Pair], int, int]:
    """(pairs, vocabulary size, pad id) as ``add_data_arguments``' options ask: the task's pairs, or ``n`` random ones."""
    if args.data == "task":
        return task_pairs()
    return random_pairs(n, args.prompt, args.completion, args.vocab, varied=args.data == "varied"), args.vocab, 0


#: --sdpa settings: which of SDPA's CUDA kernels may run (process-wide: torch.compile bakes the choice into what it
#: compiles, so settings are compared one process each). "default" leaves torch's own order (cuDNN first on Hopper)
SDPA_SETTINGS = ("default", "flash", "efficient", "cudnn", "no-cudnn")


def add_kernel_arguments(parser: Any) -> None:
    """The kernel options of investigations/host_profile.py (see ``apply_kernel_arguments``)."""
    parser.add_argument("--sdpa", default="default", choices=SDPA_SETTINGS,
                        help="SDPA's CUDA kernels allowed: one of them, all but cuDNN, or torch's default")  # fmt: skip
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config.KEY (dotted, e.g. triton.cudagraph_trees=False or "
                        "coordinate_descent_tuning=True) to a Python literal; repeatable")  # fmt: skip


def apply_kernel_arguments(parser: Any, args: Any) -> None:
    """Set the process-wide flags that ``add_kernel_arguments``' options ask for (before anything compiles)."""
    import ast
    import functools

    if args.sdpa != "default":
        allowed = {"flash": {"flash"}, "efficient": {"mem_efficient"}, "cudnn": {"cudnn"},
                   "no-cudnn": {"flash", "mem_efficient"}}[args.sdpa]  # fmt: skip
        for kernel in ("flash", "mem_efficient", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(kernel in allowed)
    for item in args.inductor:
        key, _, value = item.partition("=")
        *path, name = key.split(".")
        section = functools.reduce(getattr, path, torch._inductor.config)
        if not hasattr(section, name):
            parser.error(f"--inductor {item}: torch._inductor.config has no {key}")
        setattr(section, name, ast.literal_eval(value))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cuda_graphs_recorded() -> int:
    """How many CUDA graphs torch.compile's graph trees have recorded in this process: 0 where none ran. Inductor can
    leave graphs out without a word (a mode that never reached it, a graph partition with nothing to capture), and
    its skip counter sees only some of those cases."""
    if not torch.cuda.is_available():
        return 0
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    stack = [node for nodes in manager.roots.values() for node in nodes] if manager is not None else []
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(child for children in getattr(node, "children", {}).values() for child in children)
    return count


class DpobenchStep:
    """``CellTrainer.step`` on ``pairs`` with the plan ``dpobench run`` would choose on ``device`` for ``speed``
    (default: nothing asked), then ``plan``'s fields set on it (``pad_multiple=1``, ``compiled_head=False``, ...).
    ``steps``: the cell's planned length, which decides CUDA graphs by default (the steps per batch width)."""

    def __init__(self, model: Any, pairs: list[Pair], batch: int, device: str, pad_id: int = 0,
                 speed: SpeedOptions | None = None, variant: str = "dpo", steps: int = 10_000,
                 **plan: Any) -> None:  # fmt: skip
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        reference = ReferenceLogps(torch.zeros(len(pairs)), torch.zeros(len(pairs)))
        acceleration = replace(plan_acceleration(speed or SpeedOptions(), device, model), **plan)
        loss = dpobench.get_loss(variant).to(device)  # as the sweep does: a loss may hold buffers
        config = TrainConfig(steps=steps, batch_size=batch, lr=1e-6)
        self.trainer = CellTrainer(model, state, loss, PairSet(pairs), reference, pad_id, config, seed=0,
                                   acceleration=acceleration)  # fmt: skip

    def __call__(self) -> dict[str, float]:
        return self.trainer.step()  # its one readback waits for the device


class PlainStep:
    def __init__(self, model: Any, pairs: list[Pair], batch: int, device: str, pad_id: int = 0) -> None:
        self.model = model.to(device).train()
        self.reference = copy.deepcopy(model).eval()  # the plain loop keeps the reference model on the device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.pairs, self.batch, self.device, self.pad_id = pairs, batch, device, pad_id
        self.order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
        self.done = 0

    def __call__(self) -> None:
        start = (self.done * self.batch) % (len(self.pairs) - self.batch + 1)
        part = [self.pairs[i] for i in self.order[start : start + self.batch].tolist()]
        batch = collate(pair_rows(part), self.pad_id).to(self.device)
        plain_dpo_step(self.model, self.reference, self.optimizer, batch.input_ids, batch.attention_mask,
                       batch.target_mask, autocast=self.device.startswith("cuda"))  # fmt: skip
        sync(self.device)
        self.done += 1


def make_step(implementation: str, model: Any, pairs: list[Pair], batch: int, device: str, pad_id: int = 0,
              speed: SpeedOptions | None = None, steps: int = 10_000, **plan: Any) -> Any:  # fmt: skip
    """The step callable of ``implementation`` (dpobench, plain or trl), training ``model``; dpobench's plans
    ``steps`` steps, with ``speed`` and ``plan`` as ``DpobenchStep`` takes them (the others ignore both)."""
    if implementation == "dpobench":
        return DpobenchStep(model, pairs, batch, device, pad_id, speed=speed, steps=steps, **plan)
    if implementation == "plain":
        return PlainStep(model, pairs, batch, device, pad_id)
    if implementation == "trl":
        from .trl_step import TrlStep

        return TrlStep(model, pairs, pad_id, batch, device)
    raise ValueError(f"unknown implementation {implementation!r}: use dpobench, plain or trl")
