"""dpobench's fast training path against the plain PyTorch DPO loop of ``benchmarks/baseline.py``.

The fast path caches the reference log-probs before training, applies the LM head only at completion positions
through a fused head whose backward recomputes logits chunk by chunk, and length-buckets its batches. The plain
loop runs the reference model on every step and a full float32 log-softmax. Given the same batches, both must
train the same model to the same weights, within float32 rounding.
"""

from __future__ import annotations

import copy
import math
import random
import traceback
import warnings
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dpobench
from benchmarks.baseline import full_softmax_logp, plain_dpo_step
from dpobench.acceleration import (
    CUDA_GRAPH_MIN_STEPS_PER_WIDTH,
    Acceleration,
    CompiledLayers,
    SpeedOptions,
    batch_widths,
    check_speed,
    is_compile_error,
    plan_acceleration,
)
from dpobench.data import Pair, PairSet
from dpobench.logprobs import ReferenceLogps, collate, pair_rows, reference_logprobs, sequence_logprobs
from dpobench.models import SIZES, load_model
from dpobench.train import CellStopped, CellTrainer, TrainConfig, batch_order, train_cell


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[Pair]:
    """Pairs of task-like, varying lengths (prompts 2–9 tokens, completions 1–30), so batches carry padding."""
    rng = random.Random(seed)
    seq = lambda lo, hi: tuple(rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [Pair(seq(2, 9), seq(1, 30), seq(1, 30)) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(untrained_model):
    policy, tokenizer = load_model(untrained_model)
    return policy, copy.deepcopy(policy).eval(), tokenizer.pad_token_id, random_pairs(96, len(tokenizer))


@pytest.fixture(scope="module")
def start(setup):
    """The reference's weights (every cell starts from them) and its cached log-probs of the pairs."""
    _, reference, pad, pairs = setup
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    return state, reference_logprobs(reference, pairs, pad, device="cpu")


def assert_adam_close(got: torch.Tensor, expected: torch.Tensor, lr: float, name: str) -> None:
    """Weights trained by AdamW from the same start, by computations that differ in float rounding only: float32
    agreement except for a few elements. Adam's update is ~lr whatever the gradient's size, so a near-zero gradient
    component whose last bits differ can move by up to lr; allow that for under 0.1 % of the elements."""
    diff = (got - expected).abs()
    assert float(diff.max()) < lr, name
    off = diff > 1e-5 + 1e-4 * expected.abs()
    assert float(off.float().mean()) < 1e-3, (name, int(off.sum()))


@pytest.mark.parametrize("share_prompt", [False, True])
def test_fast_training_equals_the_plain_loop(setup, start, share_prompt) -> None:
    """Against the plain loop's one row per sequence: with that layout (float32 agreement of every weight), and with
    each pair as one row whose prompt goes through the model once (the CPU's default)."""
    policy, reference, pad, pairs = setup
    config = TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=2)
    plan = plan_acceleration(SpeedOptions(share_prompt=share_prompt), "cpu", policy)
    state, cached = start
    fast = train_cell(policy, state, dpobench.get_loss("dpo"), PairSet(pairs), cached, pad, config, seed=3,
                      evaluate=lambda m, s: {"step": s}, acceleration=plan)  # fmt: skip
    assert fast.status == "done"

    plain = copy.deepcopy(reference).train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps))
    lengths = [p.length for p in pairs]
    order = batch_order(len(pairs), config.steps, config.batch_size, 3, lengths, config.length_buckets)
    padded = 0
    for record, index in zip(fast.steps, order, strict=True):
        batch = collate(pair_rows([pairs[i] for i in index.tolist()]), pad)
        padded += int((batch.attention_mask == 0).sum())
        loss, chosen, rejected, logp = plain_dpo_step(
            plain, reference, optimizer, batch.input_ids, batch.attention_mask, batch.target_mask
        )  # fmt: skip
        schedule.step()
        b = len(index)
        expected = [loss.item(), chosen.mean().item(), rejected.mean().item(), logp[:b].mean().item()]
        got = [record[k] for k in ("loss", "chosen_reward", "rejected_reward", "chosen_logp")]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5), f"step {record['step']}"
    assert padded > 0  # the comparison covered padded rows
    moved = 0.0
    plain_parameters = dict(plain.named_parameters())
    for name, fast_p in policy.named_parameters():
        if share_prompt:  # other sums, other rounding
            assert_adam_close(fast_p.detach(), plain_parameters[name].detach(), config.lr, name)
        else:
            torch.testing.assert_close(fast_p, plain_parameters[name], rtol=1e-4, atol=2e-6, msg=name)
        moved = max(moved, float((fast_p.detach() - state[name]).abs().max()))
    assert moved > 1e-3  # the weights really moved: the equality is not that of two untrained models


def test_fused_head_gradient_equals_the_full_log_softmax(setup) -> None:
    policy, _, pad, pairs = setup
    batch = collate(pair_rows(pairs[:6]), pad)
    grads = []
    for fast in (True, False):
        policy.zero_grad()
        if fast:
            sums, _ = sequence_logprobs(policy, batch, chunk_tokens=7)  # several chunks, one partial
        else:
            sums = full_softmax_logp(policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                     batch.input_ids, batch.target_mask)  # fmt: skip
        (sums * torch.linspace(-1, 2, len(sums))).sum().backward()  # distinct weights per row
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
    policy.zero_grad()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def saved_bytes(fn) -> int:
    """Bytes of every tensor autograd keeps for the backward pass while ``fn`` runs, parameters excluded."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_fused_head_keeps_no_logits_for_the_backward_pass() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 4096  # a vocabulary much larger than the hidden size, as in real models
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config)
    batch = collate(pair_rows(random_pairs(16, vocab, seed=1)), 0)
    completion = int(batch.target_mask.sum())
    logits_bytes = completion * vocab * 4  # one float32 logit per completion token and vocabulary entry
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    decoder = saved_bytes(lambda: model.get_decoder()(**inputs))  # the same in both ways
    fused = saved_bytes(lambda: sequence_logprobs(model, batch, chunk_tokens=64)) - decoder
    plain = saved_bytes(lambda: full_softmax_logp(model(**inputs).logits, batch.input_ids, batch.target_mask)) - decoder
    assert plain > logits_bytes  # the plain way keeps at least one float32 (rows, T, V) tensor
    # the fused head keeps the completion positions' hidden states (32 floats), a few indices and scalars per
    # token (at most 32 bytes), and the boolean target mask: 77 kB here, against 8.2 MB of logits
    assert fused <= completion * (32 * 4 + 32) + batch.target_mask.numel()


def test_fused_head_under_bf16_autocast_matches_autograd(setup) -> None:
    """The CUDA path's precision handling, on the CPU's bf16 autocast: products in bf16, softmax in float32,
    float32 gradients for the float32 weights; equal to autograd through autocast logits within bf16 rounding."""
    policy, _, pad, pairs = setup
    batch = collate(pair_rows(pairs[:6]), pad)
    results = []
    for fast in (True, False):
        policy.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fast:
                sums, _ = sequence_logprobs(policy, batch, chunk_tokens=7)
            else:
                logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                sums = full_softmax_logp(logits, batch.input_ids, batch.target_mask)
        (sums * torch.linspace(-1, 2, len(sums))).sum().backward()  # distinct weights per row, some negative
        results.append((sums.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}))
    policy.zero_grad()
    (fast_sums, fast_grads), (plain_sums, plain_grads) = results
    assert fast_sums.dtype == torch.float32
    torch.testing.assert_close(fast_sums, plain_sums, rtol=2e-2, atol=2e-2)
    for name, grad in fast_grads.items():
        assert grad.dtype == torch.float32, name
        error = float((grad - plain_grads[name]).norm() / plain_grads[name].norm())
        assert error < 0.05, (name, error)  # bf16 products: ~1 % apart; a wrong scale or sign is ≥ 100 %


@pytest.mark.parametrize("autocast", [False, True])
def test_the_compiled_head_equals_the_eager_head(setup, autocast) -> None:
    """CUDA's compiled steps take the head's softmax statistics and gradient from torch.compile'd pointwise kernels
    (``compiled_head``); the eager head computes them in place. Same log-probs, WPO statistic and gradients: within
    float32 rounding, and within bf16 rounding of the gradient under bf16 autocast (compiled here by inductor's CPU
    backend, with a partial last chunk)."""
    policy, _, pad, pairs = setup
    batch = collate(pair_rows(pairs[:6]), pad)
    results = []
    for compiled in (True, False):
        policy.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sums, lss = sequence_logprobs(
                policy, batch, statistics=("logsumsq",), chunk_tokens=7, compiled_head=compiled
            )
        (sums * torch.linspace(-1, 2, len(sums))).sum().backward()  # distinct weights per row, some negative
        results.append((sums.detach(), lss["logsumsq"], {n: p.grad.clone() for n, p in policy.named_parameters()}))
    policy.zero_grad()
    (sums, lss, grads), (eager_sums, eager_lss, eager_grads) = results
    torch.testing.assert_close(sums, eager_sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lss, eager_lss, rtol=1e-5, atol=1e-4)
    for name, grad in grads.items():
        error = float((grad - eager_grads[name]).norm() / eager_grads[name].norm())
        assert error < (1e-2 if autocast else 1e-5), (name, error)  # a wrong sign or scale is ≥ 100 %


def test_the_head_gradient_kernel_is_onehot_minus_softmax_times_g() -> None:
    """``_head_grad``'s pointwise form, by hand: logits (0, ln 3) give softmax (1/4, 3/4); target 1, g = 2 gives
    (0 − 1/4, 1 − 3/4) · 2 = (−1/2, 1/2)."""
    from dpobench.logprobs import TOKEN_STATISTICS, _head_grad, _head_lse

    logits = torch.tensor([[0.0, math.log(3.0)]])
    lse = _head_lse(logits)
    lss = TOKEN_STATISTICS["logsumsq"](logits, lse)
    assert float(lse) == pytest.approx(math.log(4.0)) and float(lss) == pytest.approx(math.log(1 / 16 + 9 / 16))
    grad = _head_grad(logits, lse, torch.tensor([2.0]), torch.tensor([1]))
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.5]]))


@pytest.mark.parametrize("share_prompt", [False, True])
def test_cudas_rounded_widths_train_as_exact_widths_do(setup, start, share_prompt) -> None:
    """CUDA rounds each batch's width up to a multiple of 16 (each new width costs a cuDNN plan and a compiled
    shape); the padding lies right of every real token, so training is the same, within float32 rounding."""
    policy, _, pad, pairs = setup
    state, cached = start
    assert [plan_acceleration(SpeedOptions(), d, policy).pad_multiple for d in ("cpu", "cuda", "cuda:1")] == [1, 16, 16]
    config = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=2)
    plan = plan_acceleration(SpeedOptions(share_prompt=share_prompt), "cpu", policy)
    runs = {}
    for multiple in (1, 16):  # 16: what CUDA's plan gives
        trainer = CellTrainer(policy, state, dpobench.get_loss("dpo"), PairSet(pairs), cached, pad, config, seed=2,
                              acceleration=replace(plan, pad_multiple=multiple))  # fmt: skip
        widths = []
        for index in trainer.order[: config.steps]:
            part = [pairs[i] for i in index.tolist()]
            widths.append(max((len(p.prompt) + len(p.chosen) + len(p.rejected)) if share_prompt else p.length
                              for p in part))  # fmt: skip
        records = [trainer.step() for _ in range(config.steps)]
        runs[multiple] = (records, {k: v.clone() for k, v in policy.state_dict().items()})
    assert any(w % 16 for w in widths)  # the rounding padded some batch
    for got, expected in zip(runs[16][0], runs[1][0], strict=True):
        keys = ("loss", "chosen_reward", "rejected_reward", "chosen_logp", "grad_norm")
        assert [got[k] for k in keys] == pytest.approx([expected[k] for k in keys], rel=1e-4, abs=1e-5)
    for name, value in runs[16][1].items():
        assert_adam_close(value, runs[1][1][name], config.lr, name)
    assert float((runs[16][1]["lm_head.weight"] - state["lm_head.weight"]).abs().max()) > 1e-3  # it trained


def test_compiled_training_equals_eager_and_leaves_the_model_eager(setup) -> None:
    """``SpeedOptions(compile=True)`` compiles the decoder layers for the training steps only, as one graph that all
    (here 10) identical layers share, and trains to the eager weights."""
    from torch._dynamo.utils import counters
    from transformers import LlamaForCausalLM

    _, small, pad, pairs = setup
    config = copy.deepcopy(small.config)
    config.num_hidden_layers = 10  # more layers than dynamo's recompile limit (8) per code object
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    cached = reference_logprobs(reference, pairs, pad, device="cpu")
    runs, graphs = {}, {}
    for compiled in (False, True):
        before = counters["stats"]["unique_graphs"]
        config = TrainConfig(steps=4, batch_size=8, lr=3e-3, warmup_steps=2)
        plan = plan_acceleration(SpeedOptions(compile=compiled), "cpu", policy)
        result = train_cell(policy, state, dpobench.get_loss("dpo"), PairSet(pairs), cached, pad, config, seed=1,
                            evaluate=lambda m, s: {"step": s}, acceleration=plan)  # fmt: skip
        runs[compiled] = ([r["loss"] for r in result.steps], {k: v.clone() for k, v in policy.state_dict().items()})
        graphs[compiled] = counters["stats"]["unique_graphs"] - before
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for name, value in runs[True][1].items():
        assert_adam_close(value, runs[False][1][name], 3e-3, name)
    assert all(layer._compiled_call_impl is None for layer in policy.get_decoder().layers)
    # the layers: one graph for the first shape, one dynamic-shape recompile, not one (or eight) per layer; the
    # compiled head: its statistics and its gradient, the same (a partial last chunk)
    assert graphs[False] == 0 and 3 <= graphs[True] <= 6, graphs


def test_cuda_graphs_compile_the_layers_in_reduce_overhead_mode(setup, monkeypatch) -> None:
    """Where a cell's plan runs CUDA graphs, every decoder layer compiles in torch.compile's "reduce-overhead" mode;
    without graphs, in the default mode. A CUDA plan with enough steps per batch width decides for graphs."""
    policy = setup[0]
    layers = len(policy.get_decoder().layers)
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or fn)  # compiles nothing
    cuda = Acceleration(device="cuda", compile=True, cuda_graphs=None)
    graphed = cuda.for_batches(lambda: 2, 2 * CUDA_GRAPH_MIN_STEPS_PER_WIDTH)
    assert (graphed.cuda_graphs, graphed.compile) == (True, "reduce-overhead")
    assert len(CompiledLayers(policy, graphed).calls) == layers and modes == ["reduce-overhead"] * layers
    modes.clear()
    plain = cuda.for_batches(lambda: 2, 2 * CUDA_GRAPH_MIN_STEPS_PER_WIDTH - 1)
    assert (plain.cuda_graphs, plain.compile) == (False, True)
    assert len(CompiledLayers(policy, plain).calls) == layers and modes == [None] * layers


def test_compile_is_on_by_default_for_cuda_and_models_of_a_million_parameters(setup) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = setup[0]
    small = LlamaForCausalLM(LlamaConfig(vocab_size=512, **SIZES["small"]))
    assert sum(p.numel() for p in tiny.parameters()) < 1e6 <= sum(p.numel() for p in small.parameters())

    def compile(requested, device, model):
        return plan_acceleration(SpeedOptions(compile=requested), device, model).compile

    assert SpeedOptions().compile is None
    assert [compile(None, d, small) for d in ("cpu", "cuda", "cuda:1")] == [False, True, True]
    assert compile(None, "cuda", tiny) is False  # measured: no gain at this size
    assert compile(True, "cpu", tiny) is True and compile(False, "cuda", small) is False
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=128, n_layer=4, n_head=4))  # layers in `h`, not `layers`
    assert sum(p.numel() for p in gpt2.parameters()) >= 1e6
    assert compile(None, "cuda", gpt2) is False  # by default only a decoder whose layers it can compile


def test_prompt_sharing_is_on_by_default_for_the_cpu_and_models_that_allow_it(setup) -> None:
    """On the CPU by default (measured there), off on CUDA (measured: no faster there); never for a model that would not score
    shared rows as its own: an architecture not checked (here a hybrid with convolutions, which read the row left to
    right), eager attention (it adds the mask as a float), a sliding window (the mask would replace it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = setup[0]

    def resolve_share_prompt(requested, device, model):
        return plan_acceleration(SpeedOptions(share_prompt=requested), device, model).share_prompt

    assert SpeedOptions().share_prompt is None
    assert [resolve_share_prompt(None, d, tiny) for d in ("cpu", "cuda", "cuda:1")] == [True, False, False]
    assert resolve_share_prompt(True, "cuda", tiny) is True and resolve_share_prompt(False, "cpu", tiny) is False
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)  # fmt: skip
    cases = (
        ("lfm2", {"layer_types": ["conv", "full_attention"]}, "sdpa"), ("mistral", {"sliding_window": 64}, "sdpa"),
        ("llama", {}, "eager"),
    )  # fmt: skip
    for kind, extra, attention in cases:
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(kind, **shape, **extra), attn_implementation=attention
        )
        assert resolve_share_prompt(None, "cpu", model) is False, kind
        with pytest.raises(ValueError, match="--share-prompt needs an architecture checked to score shared rows"):
            resolve_share_prompt(True, "cpu", model)
    qwen2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **shape))  # a window, switched off
    assert resolve_share_prompt(None, "cpu", qwen2) is True


@pytest.mark.parametrize(
    ("requested", "failed_before", "expected"),
    [("reduce-overhead", False, "reduce-overhead"), (True, False, None), (True, True, None), (None, True, "eager")],
)
def test_the_requested_compile_mode_reaches_torch_compile(
    setup, start, monkeypatch, requested, failed_before, expected
) -> None:
    """``compile="reduce-overhead"`` (CUDA graphs) must reach torch.compile as that mode: it was once turned into
    True, so the benchmarks' CUDA-graph rows ran compiled without graphs. A default compile that failed earlier in
    the process trains eagerly; one asked for compiles anyway."""
    policy, _, pad, pairs = setup
    state, cached = start
    modes = []
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or fn
    )  # records, compiles nothing
    monkeypatch.setattr("dpobench.acceleration._COMPILE_FAILED", ["an earlier failure"] if failed_before else [])
    plan = Acceleration(compile=True if requested is None else requested, compile_by_default=requested is None)
    config = TrainConfig(steps=1, batch_size=8)  # compiled on the CPU, as by default on CUDA
    trainer = CellTrainer(policy, state, dpobench.get_loss("dpo"), PairSet(pairs), cached, pad, config, seed=0,
                          acceleration=plan)  # fmt: skip
    layers = len(policy.get_decoder().layers)
    assert modes == ([] if expected == "eager" else [expected] * layers)
    assert len(trainer.layers.calls) == (0 if expected == "eager" else layers)


def test_batch_widths_are_the_widths_collate_pads_to() -> None:
    """The planned widths that decide CUDA graphs: hand-worked, and equal to the batches' real widths, in both
    layouts, rounded to 16 (CUDA) and not (the CPU)."""
    lengths = [(5, 3, 9), (20, 1, 2), (2, 30, 1), (7, 7, 7)]  # prompt, chosen, rejected
    pairs = [Pair(tuple(range(1, p + 1)), tuple(range(1, c + 1)), tuple(range(1, r + 1))) for p, c, r in lengths]
    order = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([3, 0])]
    # one row per sequence: the longest prompt + completion (14, 22 | 32, 14 | 14, 14); shared: prompt + both
    assert batch_widths(order, pairs, share_prompt=False, multiple=1) == [22, 32, 14]
    assert batch_widths(order, pairs, share_prompt=False, multiple=16) == [32, 32, 16]
    assert batch_widths(order, pairs, share_prompt=True, multiple=1) == [23, 33, 21]
    assert batch_widths(order, pairs, share_prompt=True, multiple=16) == [32, 48, 32]
    for multiple in (1, 16):
        for index, width in zip(order, batch_widths(order, pairs, False, multiple), strict=True):
            part = [pairs[i] for i in index.tolist()]
            assert collate(pair_rows(part), 0, multiple).input_ids.shape[1] == width
    assert batch_widths([], pairs, False, 16) == []


@pytest.mark.parametrize(
    ("requested", "device", "mode", "widths", "steps", "expected"),
    [
        (None, "cuda", True, 3, 3 * CUDA_GRAPH_MIN_STEPS_PER_WIDTH, True),  # enough steps per width
        (None, "cuda", True, 3, 3 * CUDA_GRAPH_MIN_STEPS_PER_WIDTH - 1, False),  # one short
        (None, "cuda:1", True, 1, CUDA_GRAPH_MIN_STEPS_PER_WIDTH, True),
        (None, "cpu", True, 1, 10_000, False),  # no graphs on the CPU
        (True, "cpu", True, 1, 10_000, False),
        (None, "cuda", False, 1, 10_000, False),  # nor without compiled layers
        (True, "cuda", False, 1, 10_000, False),
        (True, "cuda", True, 50, 1, True),  # asked for: whatever the plan
        (False, "cuda", True, 1, 10_000, False),
        (None, "cuda", "reduce-overhead", 50, 1, True),  # a mode asked by name decides
        (None, "cuda", "default", 1, 10_000, False),
        (True, "cuda", "default", 1, 10_000, True),
        (False, "cuda", "reduce-overhead", 1, 10_000, False),
    ],
)
def test_cuda_graphs_run_where_the_plan_has_enough_steps_per_width(requested, device, mode, widths, steps, expected):
    plan = Acceleration(device=device, compile=mode, cuda_graphs=requested)
    assert plan.for_batches(lambda: widths, steps).cuda_graphs is expected


def test_cuda_graphs_asked_for_where_none_can_run_are_refused() -> None:
    check_speed(SpeedOptions(cuda_graphs=None), "cpu", False)
    check_speed(SpeedOptions(cuda_graphs=False), "cpu", False)
    check_speed(SpeedOptions(cuda_graphs=True), "cuda", True)
    check_speed(SpeedOptions(cuda_graphs=True), "cuda", None)  # compilation not yet known
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        check_speed(SpeedOptions(cuda_graphs=True), "cpu", True)
    with pytest.raises(ValueError, match="does not compile them"):
        check_speed(SpeedOptions(cuda_graphs=True), "cuda", False)


def test_cuda_graphs_refused_compile_the_layers_without_them(setup, start, monkeypatch) -> None:
    """``compile="reduce-overhead"`` with ``cuda_graphs=False``: the layers compile in the default mode."""
    policy, _, pad, pairs = setup
    state, cached = start
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or fn)
    plan = Acceleration(compile="reduce-overhead", cuda_graphs=False)
    trainer = CellTrainer(policy, state, dpobench.get_loss("dpo"), PairSet(pairs), cached, pad,
                          TrainConfig(steps=1, batch_size=8), seed=0, acceleration=plan)  # fmt: skip
    assert set(modes) == {None} and not trainer.plan.cuda_graphs


def _failing_backend(graph, example_inputs):
    raise RuntimeError("no C compiler found")  # what a broken toolchain looks like to dynamo


@pytest.mark.parametrize("requested", [None, True])
def test_a_failing_compiler_falls_back_to_eager_only_when_compile_was_not_asked_for(
    setup, start, monkeypatch, requested
):
    """By default (compile=None, which is on for CUDA) a compiler that fails costs a warning and the cell trains
    eagerly, to the eager weights; ``compile=True`` asked for it, so the failure is raised."""
    policy, _, pad, pairs = setup
    state, cached = start
    run = lambda plan: train_cell(  # noqa: E731
        policy, state, dpobench.get_loss("dpo"), PairSet(pairs), cached, pad, TrainConfig(steps=3, batch_size=8, lr=3e-3),
        seed=1, evaluate=lambda m, s: {"step": s}, acceleration=plan,
    )  # fmt: skip
    eager = [r["loss"] for r in run(Acceleration(compile=False)).steps]
    eager_weights = {k: v.clone() for k, v in policy.state_dict().items()}
    compile, calls = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or compile(fn, backend=_failing_backend))
    monkeypatch.setattr("dpobench.acceleration._COMPILE_FAILED", [])
    compiled = Acceleration(compile=True, compile_by_default=requested is None)  # compiled, as on CUDA
    torch._dynamo.reset()
    if requested:
        with pytest.raises(Exception, match="no C compiler found"):
            run(compiled)
        torch._dynamo.reset()
        return
    with pytest.warns(UserWarning, match="torch.compile failed, training eagerly instead.*: .*no C compiler found"):
        result = run(compiled)
    assert [r["loss"] for r in result.steps] == eager
    assert all(torch.equal(v, eager_weights[k]) for k, v in policy.state_dict().items())
    assert all(layer._compiled_call_impl is None for layer in policy.get_decoder().layers)
    assert len(calls) == len(policy.get_decoder().layers)
    # the next cell of the process does not try again: no compile, no warning, the same eager training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["loss"] for r in run(compiled).steps] == eager
    assert len(calls) == len(policy.get_decoder().layers)
    torch._dynamo.reset()


def test_only_torch_compiles_own_errors_count_as_compile_errors() -> None:
    """Errors raised while compiled code runs (out of memory, a bad index) are not the compiler's: no fallback."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    def chained(outer: Exception, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception as error:
                raise outer from error
        except Exception as error:
            return error

    torch._dynamo.reset()
    with pytest.raises(Exception) as failed:  # a real compile failure, as dynamo reports it
        torch.compile(lambda x: x * 2 + 1, backend=_failing_backend)(torch.ones(3))
    torch._dynamo.reset()
    assert isinstance(failed.value, dynamo_exc.BackendCompilerFailed) and is_compile_error(failed.value)
    assert is_compile_error(inductor_exc.InvalidCxxCompiler())
    assert is_compile_error(chained(RuntimeError("while compiling"), inductor_exc.InvalidCxxCompiler()))
    assert not is_compile_error(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(IndexError) as running:  # raised by compiled code as it runs, through dynamo's frames
        torch.compile(lambda x: x[torch.tensor(7)], backend="eager")(torch.ones(3))
    torch._dynamo.reset()
    assert not is_compile_error(running.value)
    assert not is_compile_error(chained(RuntimeError("step"), torch.OutOfMemoryError("CUDA out of memory")))


class NaNFromThirdStep(dpobench.PreferenceLoss):
    """DPO whose loss turns NaN from its third call on."""

    name = "nan_from_third_step"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "β")}
    calls = 0

    def forward(self, policy, reference, **extras):
        from dpobench.losses import log_ratios

        self.calls += 1
        dc, dr = log_ratios(policy, reference)
        losses = -torch.nn.functional.logsigmoid(self.beta * (dc - dr)) * (math.nan if self.calls >= 3 else 1.0)
        return dpobench.LossOutput(losses, (self.beta * dc).detach(), (self.beta * dr).detach())


@pytest.mark.parametrize("fused", [False, True])
def test_a_diverged_step_leaves_the_weights_as_they_were(setup, start, fused) -> None:
    """The loss turns NaN at step 3: the cell stops as diverged there and the weights (and Adam's state) are
    those after step 2. The trainer's fused AdamW learns of it on the device, without stalling the step; an unfused
    one by asking before the backward pass."""
    policy, _, pad, pairs = setup
    state, cached = start
    config = TrainConfig(steps=5, batch_size=8, lr=3e-3, warmup_steps=1)
    trainer = CellTrainer(policy, state, NaNFromThirdStep(), PairSet(pairs), cached, pad, config, seed=1)
    assert trainer.optimizer.defaults["fused"]  # the trainer's own, on the CPU as on CUDA
    if not fused:
        trainer.optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0, fused=False)
        trainer.schedule = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    trainer.step(), trainer.step()
    after_two = {k: v.clone() for k, v in policy.state_dict().items()}
    moments = [trainer.optimizer.state[p]["exp_avg"].clone() for p in policy.parameters()]
    with pytest.raises(CellStopped, match="step 3: the loss is nan") as stop:
        trainer.step()
    assert stop.value.status == "diverged"
    assert all(torch.equal(v, after_two[k]) for k, v in policy.state_dict().items())
    assert all(
        torch.equal(trainer.optimizer.state[p]["exp_avg"], m) for p, m in zip(policy.parameters(), moments, strict=True)
    )
    assert all(float(trainer.optimizer.state[p]["step"]) == 2 for p in policy.parameters())
    assert not any(torch.equal(v, state[k]) for k, v in after_two.items() if v.is_floating_point())  # it trained


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, losses, error):  # type: ignore[override]
        ctx.error = error
        return losses.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise ctx.error


class BackwardRaises(dpobench.PreferenceLoss):
    """DPO whose backward pass raises ``error``."""

    name = "backward_raises_with"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "β")}
    error: Exception = ValueError()

    def forward(self, policy, reference, **extras):
        from dpobench.losses import log_ratios

        dc, dr = log_ratios(policy, reference)
        losses = _RaiseInBackward.apply(-torch.nn.functional.logsigmoid(self.beta * (dc - dr)), self.error)
        return dpobench.LossOutput(losses, (self.beta * dc).detach(), (self.beta * dr).detach())


BACKWARD_ERRORS = [
    ValueError("bad backward"), torch.OutOfMemoryError("CUDA out of memory"),
    torch._dynamo.exc.TorchDynamoException("inductor failed"),
]  # fmt: skip


@pytest.mark.parametrize("error", BACKWARD_ERRORS, ids=["plugin", "oom", "compiler"])
def test_a_backward_that_raises_fails_its_cell_unless_the_sweep_or_compile_fallback_must_see_it(
    setup, start, error
) -> None:
    """The loss's own backward error fails the cell (and leaves no gradients behind); running out of memory goes to
    the sweep (which records that cell and goes on) and a compiler error to the compile fallback, unchanged."""
    policy, _, pad, pairs = setup
    state, cached = start
    loss = BackwardRaises()
    loss.error = error
    trainer = CellTrainer(policy, state, loss, PairSet(pairs), cached, pad, TrainConfig(steps=2, batch_size=8), seed=0)
    if isinstance(error, ValueError):
        with pytest.raises(CellStopped, match=r"^step 1: backward: ValueError: bad backward$") as stop:
            trainer.step()
        assert stop.value.status == "failed"
        assert all(p.grad is None for p in policy.parameters())
    else:
        with pytest.raises(type(error)):
            trainer.step()
    assert all(torch.equal(v, state[k]) for k, v in policy.state_dict().items())  # no update was made
    CellTrainer(policy, state, dpobench.get_loss("dpo"), PairSet(pairs), cached, pad, TrainConfig(), seed=0)
    assert all(p.grad is None for p in policy.parameters())  # the next cell starts clean, whatever was left


class DeviceReads(TorchDispatchMode):
    """Records the operators that would make the host wait for a GPU: reading a value (``.item()``, a Python bool)
    or a data-dependent shape (``nonzero``, boolean indexing). Those under ``collate`` and ``collate_shared`` (host
    tensors, before the batch is copied over) and under transformers' ``create_causal_mask`` (its check for packed
    sequences when no mask is given, at the start of the forward pass, when only the batch's copies are queued) are
    left out. Copies between host and device (``.cpu()``, ``.tolist()``, ``.to()``) do not show on the CPU, where
    they are no-ops: ``benchmarks/investigations/sync_check.py`` finds every synchronising call on CUDA, by CUDA's own debug mode."""

    READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        boolean_index = name in ("aten.index", "aten.index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )  # fmt: skip
        if name in self.READS or boolean_index:
            frames = {f.name for f in traceback.extract_stack()}
            if not frames & {"collate", "collate_shared", "create_causal_mask"}:
                self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("share_prompt", [False, True])
def test_a_training_step_reads_nothing_from_the_device_before_its_end(setup, start, share_prompt) -> None:
    """Nothing in a step waits for the device: the completion positions are indices made on the host, the per-pair
    inputs are gathered on the device, and the finiteness check goes to the fused optimizer as ``found_inf``. Its
    metrics come back in one readback at the end (``tolist``, which these operators do not see). The control: the
    old check before the backward pass (``defer_finite_check=False``) is one read, and it is seen."""
    policy, _, pad, pairs = setup
    state, cached = start
    config = TrainConfig(steps=4, batch_size=8, lr=3e-3, warmup_steps=1)
    plan = plan_acceleration(SpeedOptions(share_prompt=share_prompt), "cpu", policy)
    for deferred, expected in ((True, []), (False, ["aten._local_scalar_dense"])):
        trainer = CellTrainer(policy, state, dpobench.get_loss("wpo"), PairSet(pairs), cached, pad, config, seed=2,
                              acceleration=replace(plan, defer_finite_check=deferred))  # fmt: skip
        trainer.step()  # wpo: the per-token statistics path too
        with DeviceReads() as reads:
            record = trainer.step()
        assert reads.reads == expected and math.isfinite(record["loss"]) and record["step"] == 2


def test_length_buckets_cut_padding_and_keep_every_batch_whole() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(203)]
    steps, size = 30, 8
    random_order = batch_order(203, steps, size, seed=4)
    bucketed = batch_order(203, steps, size, seed=4, lengths=lengths, window=8)
    again = batch_order(203, steps, size, seed=4, lengths=lengths, window=8)
    assert all(torch.equal(a, b) for a, b in zip(bucketed, again, strict=True))  # deterministic
    assert [len(b) for b in bucketed] == [size] * steps
    epoch = 203 // size  # batches per epoch: an epoch drops 203 % 8 pairs, so no batch spans two epochs
    for start in range(0, steps, epoch):
        seen = torch.cat(bucketed[start : start + epoch]).tolist()
        assert len(seen) == len(set(seen))  # every pair at most once per epoch

    def padding(order):  # padded positions when each batch is padded to its longest pair
        return sum(max(lengths[i] for i in b.tolist()) * size - sum(lengths[i] for i in b.tolist()) for b in order)

    assert padding(bucketed) < 0.35 * padding(random_order)
    window = [set(b.tolist()) for b in bucketed[:8]]  # a window's batches hold the same pairs as unsorted ones
    unsorted = torch.randperm(203, generator=torch.Generator().manual_seed(4))[: 8 * size].tolist()
    assert set().union(*window) == set(unsorted)


def test_a_step_retried_after_a_compiler_failure_counts_a_stateful_loss_once(setup, start, monkeypatch) -> None:
    """A compiler that fails in the backward pass (inductor compiles it lazily) fails a step after the loss has run:
    β-DPO's running mean of the reward gaps has taken the batch in. The retried, eager step restores the loss's
    buffers first, so the batch counts once: the state after one step equals an eager step's."""
    policy, _, pad, pairs = setup
    state, cached = start
    beta_dpo = dpobench.get_losses()["beta_dpo"].cls

    class FailsOnce(torch.autograd.Function):
        failed: list[int] = []

        @staticmethod
        def forward(ctx, losses):  # type: ignore[override]
            return losses.clone()

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            if not FailsOnce.failed:
                FailsOnce.failed.append(1)
                raise torch._dynamo.exc.TorchDynamoException("the backward's compiler failed")
            return grad

    class Flaky(beta_dpo):
        def forward(self, policy, reference, **extras):
            out = super().forward(policy, reference, **extras)
            return out._replace(losses=FailsOnce.apply(out.losses))

    config = TrainConfig(steps=1, batch_size=8, lr=3e-3)
    # a reference 0.5 nats apart per pair, so that the first step's reward gaps are not 0
    cached = ReferenceLogps(cached.chosen + 0.3, cached.rejected - 0.2)
    eager = CellTrainer(policy, state, beta_dpo(filter_ratio=0.0), PairSet(pairs), cached, pad, config, seed=0,
                        acceleration=Acceleration(compile=False))  # fmt: skip
    eager.step()
    expected = float(eager.loss.gap_mean)
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="eager"))
    monkeypatch.setattr("dpobench.acceleration._COMPILE_FAILED", [])
    torch._dynamo.reset()
    flaky = CellTrainer(policy, state, Flaky(filter_ratio=0.0), PairSet(pairs), cached, pad, config, seed=0,
                        acceleration=Acceleration(compile=True, compile_by_default=True))  # fmt: skip
    with pytest.warns(UserWarning, match="torch.compile failed, training eagerly instead"):
        flaky.step()
    assert FailsOnce.failed == [1] and expected == pytest.approx(0.1 * -0.5, abs=1e-4)
    assert float(flaky.loss.gap_mean) == pytest.approx(expected, rel=1e-5)  # not twice the batch
    torch._dynamo.reset()
