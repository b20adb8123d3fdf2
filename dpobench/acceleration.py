"""How the training step runs fast: decided once per sweep into a small frozen plan that the trainer reads.

Nothing here changes what a cell computes beyond float rounding: the same loss on the same batches. What it decides
is how: whether the decoder layers are compiled (``torch.compile``) and replayed as CUDA graphs, whether a pair is one
row with its prompt once (``collate_shared``), what a batch's width is rounded up to, how many tokens go through the
LM head at a time, and whether a non-finite loss is checked on the device. The measurements behind each default are
in ``benchmarks/RESULTS.md``; the benchmarks set these fields to compare them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from dpobench._util import one_line
from dpobench.data import Pair
from dpobench.logprobs import LOGITS_BUDGET, Batch, can_share_prompt, collate, collate_shared, pair_rows, round_up

__all__ = [
    "AUTO_COMPILE_MIN_PARAMETERS",
    "CUDA_GRAPH_MIN_STEPS_PER_WIDTH",
    "CUDA_LOGITS_BUDGET",
    "CUDA_PAD_MULTIPLE",
    "LOGITS_BUDGET",  # the eager head's budget, which lives with the head (logprobs)
    "Acceleration",
    "CompiledLayers",
    "SpeedOptions",
    "batch_widths",
    "check_speed",
    "is_compile_error",
    "plan_acceleration",
]

#: the smallest model that compiles by default on CUDA: below it a step gains nothing (the 2-layer tiny model, 0.1 M
#: parameters, 1.02x on an H200) while ``small`` (3.3 M) gains 1.6x and ``base`` (134.5 M) 1.5-1.75x, for about 11 s
#: of compilation once per process
AUTO_COMPILE_MIN_PARAMETERS = 1_000_000

#: CUDA rounds each batch's width up to a multiple of this. Every new width costs once (a cuDNN attention plan, a
#: compiled shape, CUDA graphs), and length-bucketed batches come in many widths: the compiled base step ran 1.34x as
#: fast with widths rounded to 16 on an H200. The padding is right of every real token, so causal attention gives
#: the same log-probs (tests/test_logprobs.py)
CUDA_PAD_MULTIPLE = 16

#: CUDA graphs by default when a cell plans at least this many steps per distinct batch width: each new width records
#: its graphs once per process (about 0.2 s at the base size), and graphs paid back after 4 steps per width on an
#: H200; 10 leaves a margin
CUDA_GRAPH_MIN_STEPS_PER_WIDTH = 10

#: elements of one LM-head chunk's logits on CUDA with the compiled head, whose kernels read the chunk's bf16 logits
#: without a float32 copy: 4x ``LOGITS_BUDGET`` (3 chunks rather than 12 at 32 base-size pairs, 1.07x the step's
#: speed on an H200 for 0.5 GB more memory). The eager head makes float32 copies and keeps ``LOGITS_BUDGET``
CUDA_LOGITS_BUDGET = 1 << 27


@dataclass(frozen=True)
class SpeedOptions:
    """What a user asks of the fast path (``--compile``, ``--cuda-graphs``, ``--share-prompt``); None: the default.

    ``compile`` may also be a ``torch.compile`` mode by name ("reduce-overhead": CUDA graphs as well), which the
    benchmarks use."""

    compile: bool | str | None = None
    cuda_graphs: bool | None = None
    share_prompt: bool | None = None


@dataclass(frozen=True)
class Acceleration:
    """The fast path of a sweep's cells on one device and model, every choice definite (``plan_acceleration``),
    except ``cuda_graphs`` before ``for_batches`` has seen a cell's batches."""

    device: str = "cpu"
    #: False, True, or a ``torch.compile`` mode: the decoder layers compile for the training steps
    compile: bool | str = False
    #: compiled because dpobench chose to, not because it was asked: a compiler that fails then falls back to eager
    compile_by_default: bool = False
    #: the compiled layers replay as CUDA graphs; None: where a cell's batches come in few widths (``for_batches``)
    cuda_graphs: bool | None = None
    #: each pair as one row, its prompt through the model once (``collate_shared``)
    share_prompt: bool = False
    #: a batch's width is rounded up to a multiple of this
    pad_multiple: int = 1
    #: completion tokens per LM-head chunk; None: as many as ``LOGITS_BUDGET`` logits
    head_chunk_tokens: int | None = None
    #: where the layers compile, so do the LM head's softmax statistics and gradient
    compiled_head: bool = True
    #: a fused optimizer is told of a non-finite loss on the device (no mid-step sync); False: the host asks first
    defer_finite_check: bool = True

    @property
    def autocast(self) -> bool:
        """bf16 autocast on CUDA; float32 on the CPU."""
        return self.device.startswith("cuda")

    @property
    def dtype(self) -> str:
        return "bf16-autocast" if self.autocast else "float32"

    def for_batches(self, distinct_widths: Callable[[], int], steps: int) -> Acceleration:
        """This plan for a cell whose ``steps`` planned batches come in ``distinct_widths()`` widths: CUDA graphs
        decided, and the compile mode that goes with them."""
        graphs = _cuda_graphs(self.cuda_graphs, self.device, self.compile, distinct_widths, steps)
        mode = self.compile
        if graphs:
            mode = "reduce-overhead"
        elif mode == "reduce-overhead" and self.cuda_graphs is False:
            mode = True  # the mode asked for graphs, and they were refused: compiled without
        return replace(self, compile=mode, cuda_graphs=graphs)

    def describe(self, requested: SpeedOptions) -> list[str]:
        """What a user should know before training starts, one line each, with the option that changes it."""
        lines = []
        if self.compile:
            lines.append("training steps compile once per process (torch.compile; --no-compile: eager)")
            if self.autocast and requested.cuda_graphs is None:
                lines.append(f"and run as CUDA graphs in cells of {CUDA_GRAPH_MIN_STEPS_PER_WIDTH} or more steps per "
                             "batch width (--no-cuda-graphs: never)")  # fmt: skip
        if self.share_prompt:
            lines.append(
                "each pair trains as one row, its prompt through the model once (--no-share-prompt: separate rows)"
            )
        return lines

    def collate(self, pairs: Sequence[Pair], pad_id: int) -> Batch:
        """A training batch of ``pairs`` in this plan's layout."""
        if self.share_prompt:
            return collate_shared(pairs, pad_id, self.pad_multiple)
        return collate(pair_rows(pairs), pad_id, self.pad_multiple)


def plan_acceleration(options: SpeedOptions, device: str, model: Any, *, vocabulary: int | None = None) -> Acceleration:
    """The fast path for ``model`` on ``device``, as ``options`` ask and the defaults decide the rest. Raises
    ``ValueError`` (one line, naming the option) for a request that cannot be met."""
    cuda = device.startswith("cuda")
    compile = options.compile
    if compile is None:  # never on the CPU, where it does not pay at the sizes dpobench builds
        compile = cuda and _decoder_layers(model) is not None and _parameters(model) >= AUTO_COMPILE_MIN_PARAMETERS
    check_speed(options, device, compile)
    share = options.share_prompt
    if share is None:  # on CUDA a base step ran 0.95x as fast with it (bound by the host), in 0.79x the memory
        share = not cuda and can_share_prompt(model)
    elif share and not can_share_prompt(model):
        raise ValueError(
            "--share-prompt needs an architecture checked to score shared rows as its own (dpobench.logprobs."
            "SHARE_PROMPT_MODEL_TYPES) with SDPA attention, no sliding window and no ALiBi (this one: "
            f"{getattr(model.config, 'model_type', None)!r}, attention "
            f"{getattr(model.config, '_attn_implementation', None)!r}); leave it unset"
        )
    vocabulary = vocabulary or model.get_output_embeddings().weight.shape[0]
    return Acceleration(
        device=device,
        compile=compile,
        compile_by_default=options.compile is None,
        cuda_graphs=options.cuda_graphs,
        share_prompt=share,
        pad_multiple=CUDA_PAD_MULTIPLE if cuda else 1,  # on the CPU a padded position costs its full compute
        head_chunk_tokens=max(1, CUDA_LOGITS_BUDGET // vocabulary) if cuda and compile else None,
    )


def check_speed(options: SpeedOptions, device: str, compile: bool | str | None) -> None:
    """Refuse CUDA graphs where none can run: on the CPU, or where the layers do not compile (``compile`` as
    decided; None: not known yet, not checked)."""
    if not options.cuda_graphs:
        return
    if not device.startswith("cuda"):
        raise ValueError(f"--cuda-graphs: CUDA graphs need a CUDA device (this sweep's: {device!r}); drop it")
    if compile is False:
        raise ValueError(
            "--cuda-graphs: CUDA graphs run the compiled layers, and this sweep does not compile them "
            "(--no-compile, or a model under 1 M parameters): add --compile, or drop --cuda-graphs"
        )


def batch_widths(order: Sequence[torch.Tensor], pairs: Sequence[Pair], share_prompt: bool, multiple: int) -> list[int]:
    """The width of each planned batch, as ``collate`` (or ``collate_shared``) will pad it: its longest row rounded
    up to ``multiple``."""
    row = [len(p.prompt) + len(p.chosen) + len(p.rejected) if share_prompt else p.length for p in pairs]
    return [round_up(max(row[i] for i in index.tolist()), multiple) for index in order]


def _cuda_graphs(
    requested: bool | None, device: str, mode: bool | str, distinct_widths: Callable[[], int], steps: int
) -> bool:
    """Graphs need CUDA and compiled layers. A compile mode asked by name decides for itself ("reduce-overhead":
    graphs) unless graphs were asked for or refused; by default, graphs where the steps per width repay recording."""
    if not mode or not device.startswith("cuda"):
        return False
    if requested is not None:
        return requested
    if isinstance(mode, str):
        return mode == "reduce-overhead"
    return steps >= CUDA_GRAPH_MIN_STEPS_PER_WIDTH * distinct_widths()


def _decoder_layers(model: Any) -> list[Any] | None:
    layers = getattr(model.get_decoder(), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def _parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


#: messages of compile failures in this process: after one, compiling by default stops (each try costs a compile)
_COMPILE_FAILED: list[str] = []


class CompiledLayers:
    """A policy's decoder layers compiled as a plan says (one compiled graph serves every identical layer, so
    compile time does not grow with depth). They serve calls inside ``active()`` only: evaluation stays eager."""

    def __init__(self, policy: Any, plan: Acceleration) -> None:
        self.plan = plan
        mode = plan.compile
        if plan.compile_by_default and _COMPILE_FAILED:
            mode = False  # the compiler failed once in this process: eager from then on
        self.calls = _compile_layers(policy, mode, plan.compile_by_default) if mode else []

    @property
    def head(self) -> bool:
        """Whether the LM head's statistics run compiled too."""
        return self.plan.compiled_head and bool(self.calls)

    @property
    def head_chunk_tokens(self) -> int | None:
        """Completion tokens per LM-head chunk: the plan's for the compiled head; the eager head copies each chunk
        to float32, and keeps the default budget."""
        return self.plan.head_chunk_tokens if self.head else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.calls and self.plan.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        for module, call in self.calls:
            module._compiled_call_impl = call  # what nn.Module.compile() sets; __call__ then uses it
        try:
            yield
        finally:
            for module, _ in self.calls:
                module._compiled_call_impl = None

    def fall_back(self, error: BaseException) -> bool:
        """Whether ``error`` is the compiler's own and compiling was dpobench's choice: then warn, train eagerly
        from now on (in this process), and return True so that the step is retried."""
        if not (self.calls and self.plan.compile_by_default and is_compile_error(error)):
            return False
        message = one_line(error)
        warnings.warn(f"torch.compile failed, training eagerly instead (for this process): {message}", stacklevel=3)
        _COMPILE_FAILED.append(message)
        self.calls = []
        return True


def _compile_layers(policy: Any, mode: bool | str, by_default: bool) -> list[tuple[Any, Any]]:
    """(layer, compiled call) for each decoder layer; the whole decoder where it has no ``layers`` list, unless
    compiling by default (a whole deep decoder can take minutes to compile)."""
    modules = _decoder_layers(policy)
    if modules is None:
        modules = [] if by_default else [policy.get_decoder()]
    torch_mode = None if mode is True else mode
    return [(m, torch.compile(m._call_impl, dynamic=None, mode=torch_mode)) for m in modules]


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is torch.compile's own: an exception type of dynamo, inductor or Triton.
    Errors of the compiled code's running (out of memory, a bad index) are not, though they pass through it."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, torch.OutOfMemoryError):
            return False
        if type(cause).__module__.startswith(("torch._dynamo", "torch._inductor", "triton")):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
