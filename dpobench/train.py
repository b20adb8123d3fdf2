"""The one training loop, and the evaluation it calls. Only the loss differs between cells.

Every cell: the policy starts from the reference weights; the same batches in the same order (per
seed); AdamW with the same learning rate, warm-up, clipping, precision and number of steps.
"""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpobench._util import one_line as _one_line
from dpobench.data import PairSet, TaskData, decode_completion, sample_completions
from dpobench.logprobs import (
    _round_up,
    can_share_prompt,
    collate,
    collate_shared,
    pair_rows,
    rows_logprobs,
    sequence_logprobs,
)
from dpobench.losses import LogProbs, PreferenceLoss, call_loss, check_output
from dpobench.task import gold_reward, is_grammatical

__all__ = [
    "CellResult",
    "CellStopped",
    "CellTrainer",
    "Evaluator",
    "TrainConfig",
    "batch_order",
    "batch_widths",
    "train_cell",
]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: evaluate at the end only
    device: str = "cpu"
    #: batches formed from pairs of similar length, to cut padding: pairs are sorted by length within windows of
    #: this many batches of the seeded order, and the window's batches shuffled. 0: plain random batches.
    length_buckets: int = 16
    #: torch.compile each decoder layer for the training steps (regional: one compiled graph serves every identical
    #: layer, so compile time does not grow with depth); costs compile time once per process. None: on for CUDA and
    #: models of a million parameters or more (see ``resolve_compile``), off otherwise; should compilation then
    #: fail, the cell falls back to eager with a warning. A string is a torch.compile mode ("reduce-overhead": CUDA
    #: graphs as well), used by the benchmarks
    compile: bool | str | None = None
    #: each pair as one row, its prompt through the model once (``collate_shared``): the same log-probs within float
    #: rounding, fewer tokens. None: on for the CPU (where it was measured to pay) when the model allows it (see
    #: ``resolve_share_prompt``), off on CUDA, where it saves memory but not time (an H200, benchmarks/RESULTS.md)
    share_prompt: bool | None = None
    #: where the layers compile on CUDA, run them as CUDA graphs too (torch.compile's "reduce-overhead"): the step's
    #: ~1,500 kernel launches replayed from the device instead of issued one by one by the host. Numbers are
    #: unchanged; each batch width records its graphs once per process. None: on when the cell's planned batches come
    #: in few widths (see ``resolve_cuda_graphs``); True: always; False: never
    cuda_graphs: bool | None = None

    @property
    def autocast(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def dtype(self) -> str:
        return "bf16-autocast" if self.autocast else "float32"


@dataclass
class CellResult:
    steps: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    status: str = "done"  # or "failed", "diverged", "interrupted"
    error: str = ""
    batches: list[int] = field(default_factory=list)  # a fingerprint of each step's pair indices


def batch_order(
    n_pairs: int, steps: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None, window: int = 0
) -> list[torch.Tensor]:
    """The pair indices of every step: epochs of a seeded permutation, the same for every variant.

    With ``lengths`` and ``window`` > 1, batches are length-bucketed: each epoch's permutation (less its last
    ``n_pairs % batch_size`` pairs, so no batch spans two epochs) is cut into windows of ``window`` batches; a
    window's pairs are sorted by length (ties keep the seeded order), cut into batches, and those batches are
    shuffled. Each pair is still seen at most once per epoch, near its random place, in a batch of similar
    lengths."""
    generator = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    if lengths is None or window <= 1 or n_pairs < batch_size:
        order: list[torch.Tensor] = []
        while sum(len(o) for o in order) < need:
            order.append(torch.randperm(n_pairs, generator=generator))
        return list(torch.cat(order)[:need].view(steps, batch_size))
    length = torch.as_tensor(lengths)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        epoch = torch.randperm(n_pairs, generator=generator)[: n_pairs - n_pairs % batch_size]
        for start in range(0, len(epoch), window * batch_size):
            part = epoch[start : start + window * batch_size]
            part = part[torch.argsort(length[part], stable=True)].view(-1, batch_size)
            batches.extend(part[torch.randperm(len(part), generator=generator)])
    return batches[:steps]


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


class CellStopped(Exception):
    """A step that ends its cell: the loss raised or broke its contract ("failed"), or is not finite ("diverged")."""

    def __init__(self, status: str, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


class CellTrainer:
    """The training of one cell, one ``step()`` at a time: the one loop every variant goes through.

    ``train_cell`` drives it; the benchmarks time ``step()`` itself."""

    def __init__(
        self, policy: Any, reference_state: dict[str, torch.Tensor], loss: PreferenceLoss, train: PairSet,
        reference_logps: tuple[torch.Tensor, torch.Tensor], pad_id: int, config: TrainConfig, seed: int,
    ) -> None:  # fmt: skip
        self.policy, self.loss, self.pairs, self.pad_id, self.config = policy, loss, train.pairs, pad_id, config
        device = config.device
        policy.load_state_dict(reference_state)  # start from the reference weights
        policy.to(device).train()
        policy.zero_grad(set_to_none=True)  # a cell that ended mid-backward (out of memory) may have left some
        torch.manual_seed(seed)
        # fused on the CPU too: one kernel for all parameters (on 2 cores 3.3-4.1x the per-tensor loop's speed,
        # benchmarks/optimizer_speed.py), and its found_inf lets a non-finite step be skipped on the device
        self.parameters = list(policy.parameters())  # listed once: the step's gradient clipping walks no modules
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=0.0, fused=True)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps))
        )  # fmt: skip
        # per-pair inputs of the loss live on the device, so a step gathers them there (a blocking copy from the host
        # would wait for the queued forward pass)
        self.reference_chosen, self.reference_rejected = (t.to(device) for t in reference_logps)
        self.weights = torch.tensor([p.weight for p in train.pairs], dtype=torch.float32, device=device)
        self.needs_logsumsq = "logsumsq" in loss.inputs
        self.share_prompt = resolve_share_prompt(config.share_prompt, device, policy)
        self.pad_multiple = pad_multiple(device)
        lengths = [p.length for p in train.pairs]
        self.order = batch_order(
            len(train.pairs), config.steps, config.batch_size, seed, lengths, config.length_buckets
        )
        self.auto_compile = config.compile is None
        mode = resolve_compile(config.compile, device, policy)  # True, False, or a torch.compile mode (a string)
        if self.auto_compile and _COMPILE_FAILED:
            mode = False  # compiled by default, and the compiler failed once in this process: eager from then on
        #: whether the compiled layers also run as CUDA graphs (``TrainConfig.cuda_graphs``)
        self.cudagraphs = resolve_cuda_graphs(
            config.cuda_graphs, device, mode,
            lambda: len(set(batch_widths(self.order, self.pairs, self.share_prompt, self.pad_multiple))),
            config.steps,
        )  # fmt: skip
        if self.cudagraphs:
            mode = "reduce-overhead"
        elif mode == "reduce-overhead" and config.cuda_graphs is False:
            mode = True  # the mode asked for graphs, and cuda_graphs=False refused them: compiled without
        #: consecutive decoder layers per compiled region, where CUDA graphs run (``layers_per_region``; the
        #: benchmarks compare settings)
        self.layers_per_region = layers_per_region(policy) if self.cudagraphs else 1
        self.compiled = _compiled_layers(policy, mode, self.auto_compile, self.layers_per_region) if mode else []
        #: where the layers compile, so do the LM head's softmax statistics and gradient (``sequence_logprobs``'
        #: ``compiled_head``); False keeps them eager (the benchmarks compare the two)
        self.compile_head = True
        #: completion tokens per chunk of the LM head; None: as many as ``LOGITS_BUDGET`` (``CUDA_LOGITS_BUDGET``
        #: with the compiled head on CUDA) allows (the benchmarks compare settings)
        self.head_chunk_tokens: int | None = None
        self.done = 0
        #: check a fused optimizer's loss for finiteness on the device (no mid-step sync); False: ask the host before
        #: the backward pass, as the unfused path does (the benchmarks compare the two)
        self.defer_finite_check = True
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def step(self, index: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step on the pairs ``index`` (default: the next batch of the order); its metrics.

        Raises ``CellStopped`` when the loss fails or is not finite; the weights and the optimizer's moments are then
        left as they were (with a fused optimizer the learning-rate schedule has advanced: the cell ends there)."""
        try:
            return self._step(index)
        except Exception as error:  # compiled by default, not by request: a compiler that fails falls back to eager
            if isinstance(error, CellStopped) or not (self.compiled and self.auto_compile and _is_compile_error(error)):
                raise
            message = _one_line(error)
        # out of the except block, so that the failed attempt's tensors (held by the traceback) are freed first
        warnings.warn(f"torch.compile failed, training eagerly instead (for this process): {message}", stacklevel=2)
        _COMPILE_FAILED.append(message)
        self.optimizer.zero_grad(set_to_none=True)  # the failed step never reached the optimizer
        self.compiled = []
        return self._step(index)

    def _step(self, index: torch.Tensor | None) -> dict[str, float]:
        """One step, queued on the device without a sync: batch indices come from the host, the finiteness check
        goes to the optimizer as ``found_inf``, and the step's metrics come back in one readback at its end."""
        config, device, policy = self.config, self.config.device, self.policy
        start = time.perf_counter()
        index = self.order[self.done % len(self.order)] if index is None else index
        pairs = [self.pairs[i] for i in index.tolist()]
        if self.share_prompt:
            batch = collate_shared(pairs, self.pad_id, self.pad_multiple).to(device)
        else:
            batch = collate(pair_rows(pairs), self.pad_id, self.pad_multiple).to(device)
        on_device = index.to(device, non_blocking=True)
        b = len(pairs)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.autocast), _use_compiled(self.compiled):
            sums, lss = sequence_logprobs(policy, batch, logsumsq=self.needs_logsumsq, chunk_tokens=self.head_chunk_tokens,
                                          compiled_head=self.compile_head and bool(self.compiled))  # fmt: skip
        tokens = batch.tokens
        policy_lp = LogProbs(
            sums[:b], sums[b:], tokens[:b], tokens[b:], *((lss[:b], lss[b:]) if lss is not None else ())
        )
        reference = LogProbs(
            self.reference_chosen.index_select(0, on_device), self.reference_rejected.index_select(0, on_device),
            tokens[:b], tokens[b:],
        )  # fmt: skip
        step = self.done + 1
        try:  # a plugin's fault fails this cell, not the sweep
            out = call_loss(self.loss, policy_lp, reference, self.weights.index_select(0, on_device))
            check_output(out, b)
        except Exception as error:
            raise CellStopped("failed", f"step {step}: {_one_line(error)}") from error
        mean_loss = out.losses.mean()
        # a loss that is not finite is recorded as diverged, at this step; the sweep goes on. Asking the device now
        # would stall it mid-step, so a fused optimizer is told on the device to skip its update (as under AMP's
        # GradScaler), and the step is stopped once its metrics are read back
        deferred = self.defer_finite_check and bool(self.optimizer.defaults.get("fused"))
        self.optimizer.found_inf = (~torch.isfinite(mean_loss)).float() if deferred else None
        if not deferred:
            _stop_unless_finite(mean_loss.item(), step)
        try:
            mean_loss.backward()
        except Exception as error:  # the loss's own backward (an in-place edit of a saved tensor, say)
            if isinstance(error, torch.OutOfMemoryError) or _is_compile_error(error):
                raise  # the sweep's and the compile fallback's to handle
            self.optimizer.zero_grad(set_to_none=True)
            _stop_unless_finite(mean_loss.item(), step)
            raise CellStopped("failed", f"step {step}: backward: {_one_line(error)}") from error
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        margin = (out.chosen_rewards - out.rejected_rewards).detach()
        # the step's one readback: it waits for the optimizer's update, queued before it
        metrics = torch.stack([
            mean_loss.detach(), (margin > 0).float().mean(), margin.mean(), out.chosen_rewards.detach().mean(),
            out.rejected_rewards.detach().mean(), sums[:b].detach().mean(), sums[b:].detach().mean(), grad_norm,
        ]).float().tolist()  # fmt: skip
        elapsed = time.perf_counter() - start
        if deferred:  # the weights were left as they were
            _stop_unless_finite(metrics[0], step)
        self.done = step
        trained = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)  # tokens, unpadded
        names = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
                 "rejected_logp", "grad_norm")  # fmt: skip
        return {
            "step": step, **dict(zip(names, metrics, strict=True)), "step_time_ms": elapsed * 1e3,
            "pairs_per_s": b / elapsed, "tokens_per_s": trained / elapsed,
            "peak_memory_mb": peak_memory_mb(device),
        }  # fmt: skip


def _stop_unless_finite(mean_loss: float, step: int) -> None:
    if not math.isfinite(mean_loss):  # recorded as diverged, at this step; the sweep goes on
        raise CellStopped("diverged", f"step {step}: the loss is {mean_loss}")  # as a failed step says "step N: …"


#: the smallest model that TrainConfig.compile=None compiles on CUDA. Measured on an H200 (benchmarks/RESULTS.md):
#: a step of the 2-layer tiny model (0.1 M parameters) gains nothing (1.02x), while the 4-layer small (3.3 M) gains
#: 1.6x and the 30-layer base (134.5 M) 1.5-1.75x, for about 11 s of compilation once per process
AUTO_COMPILE_MIN_PARAMETERS = 1_000_000


#: messages of compile failures in this process: after one, compile=None stops trying (each try costs a compile)
_COMPILE_FAILED: list[str] = []


def resolve_compile(compile: bool | str | None, device: str, model: Any) -> bool | str:
    """``TrainConfig.compile`` made definite for ``model``: None (the default) compiles on CUDA, for models of
    ``AUTO_COMPILE_MIN_PARAMETERS`` or more whose decoder has a list of ``layers``; never on the CPU, where it does
    not pay at the sizes dpobench builds."""
    if compile is not None:
        return compile
    return (
        device.startswith("cuda")
        and _decoder_layers(model) is not None
        and sum(p.numel() for p in model.parameters()) >= AUTO_COMPILE_MIN_PARAMETERS
    )


#: CUDA rounds each batch's width up to a multiple of this. Every new width costs once: a cuDNN attention plan, a
#: compiled layer's shape (and CUDA graphs, where used), and the task's length-bucketed batches come in many widths.
#: Measured on an H200 (benchmarks/RESULTS.md, 2026-11-27, third GPU session): on pairs of varying length, the
#: compiled base step with widths rounded to 16 ran 141.8 ms against 190.7 ms with exact widths. The padding is
#: right of every real token, so causal attention gives the same log-probs (tests/test_logprobs.py)
CUDA_PAD_MULTIPLE = 16


def pad_multiple(device: str) -> int:
    """What a training batch's width is rounded up to: ``CUDA_PAD_MULTIPLE`` on CUDA; 1 on the CPU, where a padded
    position costs its full compute and shapes cost nothing."""
    return CUDA_PAD_MULTIPLE if device.startswith("cuda") else 1


#: CUDA graphs by default (``TrainConfig.cuda_graphs=None``) when a cell's planned steps number at least this many per
#: distinct batch width. Each new width records its graphs once per process, and the following steps of that width
#: repay it. Measured on an H200 (benchmarks/cudagraph_check.py; benchmarks/RESULTS.md, 2026-11-27, fourth GPU
#: session), base size, 32 pairs of varying length per step: recording cost 203 ms per new width beyond a step, and a
#: step at a known width took 68.4 ms against 114.3 ms without graphs, so graphs paid after 4 steps per width; a
#: second cell reused the first one's graphs. 10 leaves a margin (the cost was measured with the compiled shapes warm)
CUDA_GRAPH_MIN_STEPS_PER_WIDTH = 10


def resolve_cuda_graphs(
    cuda_graphs: bool | None, device: str, mode: bool | str, distinct_widths: Callable[[], int], steps: int
) -> bool:
    """``TrainConfig.cuda_graphs`` made definite for a cell compiled with ``mode`` (``resolve_compile``'s) whose
    ``steps`` planned batches come in ``distinct_widths()`` widths. Graphs need CUDA and compiled layers: None is then
    False, as is True on the CPU (``check_cuda_graphs`` refuses the request before a sweep starts). A compile mode
    asked by name decides for itself ("reduce-overhead": graphs; any other: none) unless ``cuda_graphs`` is given.
    None otherwise: graphs when there are at least ``CUDA_GRAPH_MIN_STEPS_PER_WIDTH`` steps per width."""
    if not mode or not device.startswith("cuda"):
        return False
    if cuda_graphs is not None:
        return cuda_graphs
    if isinstance(mode, str):
        return mode == "reduce-overhead"
    return steps >= CUDA_GRAPH_MIN_STEPS_PER_WIDTH * distinct_widths()


def check_cuda_graphs(cuda_graphs: bool | None, device: str, compile: bool | str | None) -> None:
    """Refuse ``cuda_graphs=True`` where no graph can run: on the CPU, or where the layers do not compile (``compile``
    as ``resolve_compile`` made it definite; None: not known yet, not checked)."""
    if not cuda_graphs:
        return
    if not device.startswith("cuda"):
        raise ValueError(f"CUDA graphs need a CUDA device (this sweep's: {device!r}); drop --cuda-graphs")
    if compile is False:
        raise ValueError(
            "CUDA graphs run the compiled layers, and this sweep does not compile them (--no-compile, or a model "
            "under 1 M parameters): add --compile, or drop --cuda-graphs"
        )


def batch_widths(order: Sequence[torch.Tensor], pairs: Sequence[Any], share_prompt: bool, multiple: int) -> list[int]:
    """The width of each planned batch, as ``collate`` (or ``collate_shared``) will pad it: its longest row rounded
    up to ``multiple``."""
    row = [len(p.prompt) + len(p.chosen) + len(p.rejected) if share_prompt else p.length for p in pairs]
    return [_round_up(max(row[i] for i in index.tolist()), multiple) for index in order]


def resolve_share_prompt(share: bool | None, device: str, model: Any) -> bool:
    """``TrainConfig.share_prompt`` made definite for ``model``. None (the default): on for the CPU when the model
    can take shared-prompt rows (``can_share_prompt``); off on CUDA, where a base-size H200 step ran 0.95x as fast
    with it (bound by the host) in 0.79x the memory. True for a model that cannot take them is refused."""
    if share is None:
        return not device.startswith("cuda") and can_share_prompt(model)
    if share and not can_share_prompt(model):
        raise ValueError(
            "share_prompt needs an architecture checked to score shared rows as its own (dpobench.logprobs."
            "SHARE_PROMPT_MODEL_TYPES) with SDPA attention, no sliding window and no ALiBi (this one: "
            f"{getattr(model.config, 'model_type', None)!r}, attention "
            f"{getattr(model.config, '_attn_implementation', None)!r}); leave share_prompt unset"
        )
    return share


def _decoder_layers(model: Any) -> list[Any] | None:
    layers = getattr(model.get_decoder(), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


#: with CUDA graphs, up to this many consecutive decoder layers compile into one region, replayed as one graph forward
#: and one backward. 1: layer by layer. A replay costs the host the same whatever it holds (torch.compile's wrappers,
#: the graph tree's checks: about 0.5 ms per layer, forward and backward, under cProfile on an H200's host), so
#: regions were to take that off a host-bound step. Measured on an H200 (benchmarks/RESULTS.md, 2026-11-27, fifth GPU
#: session; step_ab.py, base size, 32 pairs, 10 interleaved rounds): 64.85 ms a step with 3 layers per region, 64.69
#: with 5, 65.38 with 1, within noise, since the step had become bound by the device (the head's larger chunks and
#: a faster collate, the same session). So it stays 1, and a region costs no extra compile time
CUDA_GRAPH_LAYERS_PER_REGION = 1


#: architectures whose decoder calls every layer alike and chains only the hidden states, which a region assumes
#: (tests/test_fast_path.py compares regions with eager). Others give layers their own arguments (per-layer rotary
#: bases in GraniteSWA) or pass one layer's extra output to the next (GLM-MoE-DSA's top-k indices), which a region
#: would get wrong
REGION_MODEL_TYPES = frozenset({"llama"})


def layers_per_region(model: Any, most: int | None = None) -> int:
    """How many consecutive decoder layers of ``model`` to compile as one region: the largest divisor of the layer
    count up to ``most`` (``CUDA_GRAPH_LAYERS_PER_REGION``), where every layer is of one class and attention type
    (the config's ``layer_types``: the decoder gives each layer its type's mask, and a region passes the first
    one's on) and the architecture is one of ``REGION_MODEL_TYPES``; else 1."""
    most = CUDA_GRAPH_LAYERS_PER_REGION if most is None else most
    layers, config = _decoder_layers(model), model.config
    types = set(getattr(config, "layer_types", None) or ())
    if (
        config.model_type not in REGION_MODEL_TYPES
        or not layers
        or len(layers) != getattr(config, "num_hidden_layers", None)  # a decoder that runs only some of its list
        or len(types) > 1
        or len({(type(m), getattr(m, "attention_type", None)) for m in layers}) > 1
    ):
        return 1
    return max(k for k in range(1, max(1, most) + 1) if len(layers) % k == 0)


def _run_layers(layers: tuple[Any, ...], *args: Any, **kwargs: Any) -> Any:
    """Consecutive decoder layers, each called as the decoder calls the first (the same mask, positions and
    options), each on the hidden states that the one before returned."""
    out = layers[0]._call_impl(*args, **kwargs)
    for layer in layers[1:]:
        hidden = out[0] if isinstance(out, tuple) else out
        out = (
            layer._call_impl(hidden, *args[1:], **kwargs)
            if args
            else layer._call_impl(**kwargs | {"hidden_states": hidden})
        )
    return out


class _Region:
    """A compiled region of consecutive layers: the first layer's call runs them all, the others pass on what they
    are given (the region's output, which they have already applied), in the form the layers return."""

    def __init__(self, layers: tuple[Any, ...], compiled: Callable[..., Any]) -> None:
        self.layers, self.compiled, self.returns_tuple = layers, compiled, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.compiled(self.layers, *args, **kwargs)
        self.returns_tuple = isinstance(out, tuple)
        if self.returns_tuple and len(out) > 1:  # what else a layer returns, the later layers could not hand on
            raise TypeError(
                f"a region's layers return {len(out)} values; regions take layers that return the hidden states"
            )
        return out

    def passthrough(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.returns_tuple else hidden


def _compiled_layers(
    policy: Any, mode: bool | str = True, auto: bool = False, per_region: int = 1
) -> list[tuple[Any, Any]]:
    """(layer, compiled call) for each decoder layer; the whole decoder where it has no ``layers`` list (not by
    default, ``auto``: a whole deep decoder can take minutes to compile). ``mode``: True, or a ``torch.compile``
    mode such as "reduce-overhead" (CUDA graphs). ``per_region`` > 1 (a divisor of the layer count): that many
    consecutive layers per compiled region (``layers_per_region``); one compiled graph serves every region."""
    modules = _decoder_layers(policy)
    torch_mode = None if mode is True else mode
    if modules is None:
        modules = [] if auto else [policy.get_decoder()]
    if per_region <= 1 or len(modules) % per_region:
        return [(m, torch.compile(m._call_impl, dynamic=None, mode=torch_mode)) for m in modules]
    compiled = torch.compile(_run_layers, dynamic=None, mode=torch_mode)
    calls = []
    for start in range(0, len(modules), per_region):
        region = _Region(tuple(modules[start : start + per_region]), compiled)
        calls += [(region.layers[0], region)] + [(m, region.passthrough) for m in region.layers[1:]]
    return calls


def _is_compile_error(error: BaseException) -> bool:
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


@contextlib.contextmanager
def _use_compiled(compiled: list[tuple[Any, Any]]):
    """The compiled layers serve calls inside this block only: evaluation and sampling stay eager."""
    for module, call in compiled:
        module._compiled_call_impl = call  # what nn.Module.compile() sets; __call__ then uses it
    try:
        yield
    finally:
        for module, _ in compiled:
            module._compiled_call_impl = None


def train_cell(
    policy: Any,
    reference_state: dict[str, torch.Tensor],
    loss: PreferenceLoss,
    train: PairSet,
    reference_logps: tuple[torch.Tensor, torch.Tensor],
    pad_id: int,
    config: TrainConfig,
    seed: int,
    evaluate: Callable[[Any, int], dict[str, float]],
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CellResult:
    trainer = CellTrainer(policy, reference_state, loss, train, reference_logps, pad_id, config, seed)
    result = CellResult()
    for index in trainer.order:
        result.batches.append(hash(tuple(index.tolist())))
        try:
            result.steps.append(trainer.step(index))
        except CellStopped as stop:
            result.status, result.error = stop.status, stop.error
            break
        step = trainer.done
        if on_step:
            on_step(step)
        if should_stop is not None and should_stop():  # Ctrl-C: this step is finished, the cell is not
            result.status, result.error = "interrupted", f"interrupted after step {step}"
            return result
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            if not _evaluate_into(result, evaluate, policy, step):
                break
    if result.status == "done":
        _evaluate_into(result, evaluate, policy, config.steps)
    return result


def _evaluate_into(
    result: CellResult, evaluate: Callable[[Any, int], dict[str, float]], policy: Any, step: int
) -> bool:
    try:
        result.evaluations.append(evaluate(policy, step))
        return True
    except Exception as error:  # the held-out rewards call the plugin's loss too
        result.status, result.error = "failed", f"evaluation at step {step}: {_one_line(error)}"
        return False


@dataclass
class Evaluator:
    """Samples from a policy on held-out prompts and scores them; implicit rewards on held-out pairs."""

    reference: Any
    tokenizer: Any
    data: TaskData
    heldout_reference: tuple[torch.Tensor, torch.Tensor]
    device: str = "cpu"
    max_new_tokens: int = 48
    autocast: bool = False

    @torch.no_grad()
    def __call__(self, policy: Any, step: int, loss: PreferenceLoss | None, seed: int) -> dict[str, float]:
        """Metrics of ``policy`` after ``step`` steps; ``loss=None`` skips the implicit rewards (the reference)."""
        policy.eval()
        try:
            return {"step": step, **self._samples(policy, seed), **(self._heldout(policy, loss) if loss else {})}
        finally:
            policy.train()

    def _samples(self, policy: Any, seed: int) -> dict[str, float]:
        prompts = self.data.eval_prompts
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            samples = [s[0] for s in sample_completions(
                policy, self.tokenizer, prompts, samples=1, max_new_tokens=self.max_new_tokens, seed=seed + 1000,
                device=self.device,
            )]  # fmt: skip
        rows = list(zip(prompts, samples, strict=True))
        policy_lp = self._logps(policy, rows)
        reference_lp = self._logps(self.reference, rows)
        lengths = [sum(1 for t in s if t != self.tokenizer.eos_token_id) for s in samples]
        metrics = {
            "kl_to_reference": float((policy_lp - reference_lp).mean()),  # E_{y~π}[log π(y) − log π_ref(y)]
            "response_length": statistics.fmean(lengths),
            "n_samples": float(len(samples)),
        }
        if self.data.has_gold:  # metrics that need a gold reward exist only for the synthetic task
            texts = [decode_completion(self.tokenizer, s) for s in samples]
            gold = [gold_reward(t) for t in texts]
            metrics["gold_reward"] = statistics.fmean(gold)
            metrics["gold_samples"] = gold  # per evaluation prompt, in order: the report pairs cells by prompt
            metrics["gold_reward_se"] = statistics.stdev(gold) / math.sqrt(len(gold)) if len(gold) > 1 else math.nan
            metrics["grammatical_fraction"] = statistics.fmean(float(is_grammatical(t)) for t in texts)
        return metrics

    def _logps(self, model: Any, rows: list[tuple[Any, Any]]) -> torch.Tensor:
        was_on = next(model.parameters()).device
        model.to(self.device)
        out = rows_logprobs(model, rows, self.tokenizer.pad_token_id, device=self.device, autocast=self.autocast)
        model.to(was_on)
        return out

    def _heldout(self, policy: Any, loss: PreferenceLoss) -> dict[str, float]:
        pairs = self.data.heldout.pairs
        if not pairs:
            return {}
        policy_lp = self._logps(policy, pair_rows(pairs))
        n = len(pairs)
        tokens = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs], dtype=torch.float32)
        ref_c, ref_r = self.heldout_reference
        out = call_loss(
            loss, LogProbs(policy_lp[:n], policy_lp[n:], tokens[:n], tokens[n:]),
            LogProbs(ref_c, ref_r, tokens[:n], tokens[n:]), torch.tensor([p.weight for p in pairs]),
        ) if "logsumsq" not in loss.inputs else None  # fmt: skip
        if out is None:  # WPO needs per-token statistics: held-out rewards are those of its base, β·Δ
            margin = loss.hparams.get("beta", 1.0) * ((policy_lp[:n] - ref_c) - (policy_lp[n:] - ref_r))
        else:
            margin = out.chosen_rewards - out.rejected_rewards
        return {
            "heldout_reward_accuracy": float((margin > 0).float().mean()),
            "heldout_reward_margin": float(margin.mean()),
        }
