"""Completion log-probs against an independent full log-softmax computation."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dpobench
from dpobench.data import Pair
from dpobench.logprobs import (
    SHARE_PROMPT_MODEL_TYPES,
    can_share_prompt,
    collate,
    collate_shared,
    pair_rows,
    sequence_logprobs,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).eval()


ROWS = [((1, 5, 6), (7, 8, 2)), ((1, 9), (10, 11, 12, 13, 2)), ((1, 3, 4, 5, 6), (2,))]


def reference_computation(model, rows):
    """One sequence at a time, no padding, full log-softmax: Σ over completion tokens of log p."""
    sums, lss = [], []
    for prompt, completion in rows:
        ids = torch.tensor([[*prompt, *completion]])
        logits = model(input_ids=ids).logits[0, :-1].double()
        logp = torch.log_softmax(logits, -1)
        positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
        sums.append(sum(logp[t, ids[0, t + 1]] for t in positions))
        lss.append(sum(torch.logsumexp(2 * logp[t], -1) for t in positions))
    return torch.stack(sums).float(), torch.stack(lss).float()


@pytest.mark.parametrize("chunk_tokens", [3, 8192])
def test_matches_full_log_softmax(model, chunk_tokens: int) -> None:
    batch = collate(ROWS, pad_id=0)
    with torch.no_grad():
        sums, lss = sequence_logprobs(model, batch, statistics=("logsumsq",), chunk_tokens=chunk_tokens)
    expected_sums, expected_lss = reference_computation(model, ROWS)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lss["logsumsq"], expected_lss, rtol=1e-5, atol=1e-5)
    assert batch.tokens.tolist() == [3.0, 5.0, 1.0]


def test_collated_ids_are_each_rows_tokens_then_the_pad_id() -> None:
    """Both layouts' token ids, hand-worked with a pad id of 7 (tokens as tuples and as lists, an empty part, a
    row as wide as the batch), and against the nested-list padding that ``_pad_rows`` replaced, on random rows."""
    rows = [((1, 2), (3,)), ([4], [5, 6, 8, 9]), ((), (10, 11))]
    assert collate(rows, 7).input_ids.tolist() == [[1, 2, 3, 7, 7], [4, 5, 6, 8, 9], [10, 11, 7, 7, 7]]
    assert collate(rows, 7, multiple=4).input_ids.tolist() == [[1, 2, 3, 7, 7, 7, 7, 7], [4, 5, 6, 8, 9, 7, 7, 7],
                                                               [10, 11, 7, 7, 7, 7, 7, 7]]  # fmt: skip
    pairs = [Pair((1, 2), (3,), (4, 5)), Pair((6,), (8, 9, 10), ())]
    assert collate_shared(pairs, 7).input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 8, 9, 10, 7]]
    rng = random.Random(0)
    for _ in range(50):
        seq = lambda: tuple(rng.randrange(1, 500) for _ in range(rng.randint(0, 9)))  # noqa: E731
        rows = [(seq(), seq() or (1,)) for _ in range(rng.randint(1, 6))]
        pad, multiple = rng.randrange(0, 1000), rng.choice([1, 16])
        ids = collate(rows, pad, multiple).input_ids
        width = ids.shape[1]
        assert torch.equal(ids, torch.tensor([[*p, *c, *([pad] * (width - len(p) - len(c)))] for p, c in rows]))


def test_padding_does_not_change_a_row(model) -> None:
    alone = sequence_logprobs(model, collate(ROWS[:1], 0))[0]
    padded = sequence_logprobs(model, collate(ROWS, 0))[0][:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


def test_a_width_rounded_up_to_a_multiple_changes_no_log_prob(model) -> None:
    """``collate(..., multiple=16)`` (CUDA graphs' bounded shapes) pads to width 16; the sums are the reference's."""
    batch = collate(ROWS, 0, multiple=16)
    assert batch.input_ids.shape == (3, 16) and batch.target_mask.shape == (3, 15)
    assert batch.attention_mask.sum(1).tolist() == [6, 7, 6] and batch.target_mask.sum(1).tolist() == [3, 5, 1]
    with torch.no_grad():
        sums, _ = sequence_logprobs(model, batch)
    torch.testing.assert_close(sums, reference_computation(model, ROWS)[0], rtol=1e-5, atol=1e-5)
    assert collate(ROWS, 0, multiple=1).input_ids.shape == (3, 7)


def test_gradient_flows_to_the_model(model) -> None:
    sums, _ = sequence_logprobs(model, collate(ROWS, 0))
    sums.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_shared_prompt_layout_by_hand() -> None:
    """``collate_shared``: one row per pair, prompt + chosen + rejected; the rejected completion's positions restart
    after the prompt and it sees the prompt and itself, not the chosen completion."""
    batch = collate_shared([Pair((5, 6), (7, 8, 9), (10,)), Pair((11,), (12,), (13, 14))], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    # sequences: chosen 0, 1, then rejected 2, 3; a prompt's last position predicts both first tokens
    assert batch.positions.tolist() == [1, 2, 3, 6, 1, 6, 8]
    assert batch.targets.tolist() == [7, 8, 9, 12, 10, 13, 14]
    assert batch.rows.tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert batch.tokens.tolist() == [3.0, 1.0, 1.0, 2.0] and batch.size == 4
    mask = batch.causal_mask[:, 0]
    T, F = True, False
    assert mask[0, 4].tolist() == [T, T, T, T, T, F]  # chosen's last token: the prompt and the chosen tokens
    assert mask[0, 5].tolist() == [T, T, F, F, F, T]  # rejected: the prompt and itself, not the chosen tokens
    assert mask[1, 3].tolist() == [T, F, T, T, F, F]
    assert mask[1, 4].tolist() == [T, T, T, T, T, F]  # a pad sees what is before it (its output is never used)
    assert collate_shared([Pair((5, 6), (7, 8, 9), (10,))], 0, multiple=16).input_ids.shape == (1, 16)


SHARED = [Pair((1, 5, 6), (7, 8, 2), (9, 2)), Pair((1, 9), (10, 11, 12, 13, 2), (3, 2)), Pair((4,), (2,), (6, 7, 8, 2))]


@pytest.mark.parametrize("multiple", [1, 16])
def test_shared_prompt_log_probs_are_each_sequences_own(model, multiple: int) -> None:
    """Each sequence's sums (and WPO's per-token statistic) equal those of the sequence alone, unpadded, through a
    full log-softmax."""
    with torch.no_grad():
        sums, lss = sequence_logprobs(
            model, collate_shared(SHARED, 0, multiple), statistics=("logsumsq",), chunk_tokens=3
        )
    expected_sums, expected_lss = reference_computation(model, pair_rows(SHARED))
    torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lss["logsumsq"], expected_lss, rtol=1e-5, atol=1e-5)


def test_shared_prompt_gradients_equal_one_row_per_sequence(model) -> None:
    """The prompt, computed once, gets the gradient that its two copies get between them."""
    weights = torch.tensor([0.3, -1.2, 0.7, 2.0, -0.4, 1.1])  # a different upstream gradient per sequence
    grads = []
    for batch in (collate(pair_rows(SHARED), 0), collate_shared(SHARED, 0)):
        model.zero_grad()
        (sequence_logprobs(model, batch)[0] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_empty_completion_has_no_target() -> None:
    """A completion of no tokens predicts nothing in either layout (its sum is 0), even where nothing pads the row."""
    pairs = [Pair((5, 6), (7, 8), ()), Pair((9,), (), (10, 11))]
    shared, rows = collate_shared(pairs, 0), collate(pair_rows(pairs), 0)
    assert shared.targets.tolist() == [7, 8, 10, 11] and shared.rows.tolist() == [0, 0, 3, 3]
    assert sorted(zip(rows.rows.tolist(), rows.targets.tolist(), strict=True)) == [(0, 7), (0, 8), (3, 10), (3, 11)]


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
#: per architecture, what its config needs beyond SMALL to build at that size
SHAPES = {
    "codegen": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, n_ctx=128, rotary_dim=8),
    "deepseek_v3": dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, first_k_dense_replace=2),
    "falcon": dict(new_decoder_architecture=False, alibi=False, num_kv_heads=2),
    "gemma": dict(head_dim=16), "glm": dict(head_dim=16), "glm4": dict(head_dim=16),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "gptj": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, rotary_dim=8),
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1), "nemotron": dict(head_dim=16),
    "olmoe": dict(num_experts=2, num_experts_per_tok=1), "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "qwen2_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16),
}  # fmt: skip


def small_model(kind: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(kind, **{**SMALL, **SHAPES.get(kind, {}), **extra})
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def random_pairs() -> list[Pair]:
    rng = random.Random(0)
    seq = lambda lo, hi: tuple(rng.randint(3, 63) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [Pair(seq(1, 8), seq(1, 10), seq(1, 10)) for _ in range(8)]


@pytest.mark.parametrize("kind", sorted(SHARE_PROMPT_MODEL_TYPES))
def test_every_architecture_allowed_to_share_the_prompt_scores_it_as_its_own_rows(kind: str) -> None:
    pairs = random_pairs()
    model = small_model(kind, **({"sliding_window": None} if kind == "mistral" else {}))
    assert can_share_prompt(model)
    with torch.no_grad():
        rows, rows_lss = sequence_logprobs(model, collate(pair_rows(pairs), 0), statistics=("logsumsq",))
        shared, shared_lss = sequence_logprobs(model, collate_shared(pairs, 0), statistics=("logsumsq",))
    torch.testing.assert_close(shared, rows, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(shared_lss["logsumsq"], rows_lss["logsumsq"], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("lfm2", dict(layer_types=["conv", "full_attention"])),  # a convolution reads the row left to right
        ("qwen3_next", dict(head_dim=16, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                            linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])),
        ("mistral", dict(sliding_window=64)),  # the mask would replace the window
        ("qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=64, max_window_layers=0)),
        ("falcon", dict(alibi=True, num_kv_heads=2)),  # ALiBi is built from a 2-D mask
    ],
)  # fmt: skip
def test_architectures_that_would_score_shared_rows_otherwise_keep_one_row_per_sequence(kind: str, extra: dict) -> None:
    model = small_model(kind, **extra)
    assert not can_share_prompt(model)
    if kind in ("lfm2", "qwen3_next"):  # the evidence: the rejected completion's scores change
        pairs = random_pairs()
        with torch.no_grad():
            rows = sequence_logprobs(model, collate(pair_rows(pairs), 0))[0]
            shared = sequence_logprobs(model, collate_shared(pairs, 0))[0]
        assert float((rows - shared).abs().max()) > 2e-5  # above the rounding allowed above


def test_every_declarable_statistic_has_its_computation_and_arrives_by_name() -> None:
    """A statistic a variant can declare is a pair of LogProbs fields and an entry of ``TOKEN_STATISTICS``; the
    harness splits rows into the two fields and strips what a variant did not declare. By hand: log Σ_v p(v)² of
    logits (0, ln 3) is log(1/16 + 9/16)."""
    from dpobench.logprobs import TOKEN_STATISTICS
    from dpobench.losses import KNOWN_INPUTS, STATISTICS, LogProbs, sequence_inputs

    assert STATISTICS == tuple(TOKEN_STATISTICS) == ("logsumsq",)
    assert KNOWN_INPUTS == {"weights", "margin", "token_logps", "token_kl", "kl_logps", "moving_reference", "logsumsq"}
    logits = torch.tensor([[0.0, math.log(3.0)]])
    value = TOKEN_STATISTICS["logsumsq"](logits, torch.logsumexp(logits, -1))
    assert float(value) == pytest.approx(math.log(10 / 16))
    rows = LogProbs.from_rows(torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]),
                              {"logsumsq": torch.tensor([-0.1, -0.2, -0.3, -0.4])})  # fmt: skip
    assert rows.chosen.tolist() == [-1.0, -2.0] and rows.rejected_tokens.tolist() == [3.0, 4.0]
    assert rows.chosen_logsumsq.tolist() == pytest.approx([-0.1, -0.2])
    assert rows.rejected_logsumsq.tolist() == pytest.approx([-0.3, -0.4])
    stripped = rows.without(["logsumsq"])
    assert stripped.chosen_logsumsq is None and stripped.rejected_logsumsq is None
    assert stripped.without(["logsumsq"]) is stripped  # nothing to strip: no copy
    assert sequence_inputs(dpobench.get_loss("wpo")) == ("logsumsq",)
    assert sequence_inputs(dpobench.get_loss("dpo")) == ()
    assert sequence_inputs(dpobench.get_loss("ld_dpo")) == ("token_logps",)


def per_token_computation(model, rows, width):
    """One sequence at a time, full log-softmax: each completion token's log p, as (rows, width) padded with 0."""
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, (prompt, completion) in enumerate(rows):
        ids = torch.tensor([[*prompt, *completion]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        for j, t in enumerate(range(len(prompt) - 1, len(prompt) + len(completion) - 1)):
            out[i, j] = logp[t, ids[0, t + 1]]
    return out


@pytest.mark.parametrize("layout", ["rows", "shared"])
def test_per_token_log_probs_are_each_tokens_own_and_carry_the_gradient(model, layout: str) -> None:
    """``token_logps`` against a one-sequence-at-a-time log-softmax, in both layouts (the shared one lists a pair's
    rejected positions after every chosen one), and the gradient of a per-token weighting through them equals the
    same weighting of the independent computation's."""
    pairs = [Pair((1, 5, 6), (7, 8, 2), (9, 2)), Pair((1, 9), (10, 2), (11, 12, 13, 2)), Pair((4,), (2,), (5, 6, 2))]
    rows = pair_rows(pairs)
    batch = collate(rows, 0) if layout == "rows" else collate_shared(pairs, 0)
    width = 6
    sums, stats = sequence_logprobs(model, batch, statistics=("token_logps",), token_width=width)
    expected = per_token_computation(model, rows, width)
    torch.testing.assert_close(stats["token_logps"].double(), expected, rtol=1e-5, atol=1e-5)
    assert stats["token_logps"].dtype == torch.float32
    torch.testing.assert_close(stats["token_logps"].sum(1), sums)
    weights = torch.linspace(0.5, 2.0, width)
    model.zero_grad()
    (stats["token_logps"] * weights).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (per_token_computation(model, rows, width) * weights.double()).sum().backward()
    for a, b in zip(ours, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    model.zero_grad()


def sequential_kl_computation(model, reference, rows):
    """One sequence at a time, full log-softmax: Σ over completion positions of KL(π_ref ‖ π), float64."""
    out = []
    for prompt, completion in rows:
        ids = torch.tensor([[*prompt, *completion]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        with torch.no_grad():
            ref = torch.log_softmax(reference(input_ids=ids).logits[0, :-1].double(), -1)
        positions = list(range(len(prompt) - 1, len(prompt) + len(completion) - 1))
        out.append((ref[positions].exp() * (ref[positions] - logp[positions])).sum())
    return torch.stack(out)


@pytest.mark.parametrize(("layout", "chunk_tokens"), [("rows", 3), ("rows", 8192), ("shared", 8192)])
def test_sequential_kl_is_each_sequences_own_and_its_gradient_the_policys(
    model, layout: str, chunk_tokens: int
) -> None:
    """``token_kl`` (TDPO's input) against a one-sequence-at-a-time full log-softmax, in both layouts and with the
    head in chunks, and its gradient reaches the policy only: equal to the independent computation's; 0 against
    itself."""
    import copy

    torch.manual_seed(1)
    reference, model = model, copy.deepcopy(model)  # the module's model stays as it is for the other tests
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = [Pair((1, 5, 6), (7, 8, 2), (9, 2)), Pair((1, 9), (10, 2), (11, 12, 13, 2))]
    rows = pair_rows(pairs)
    batch = collate(rows, 0) if layout == "rows" else collate_shared(pairs, 0)
    _, stats = sequence_logprobs(model, batch, statistics=("token_kl",), reference=reference, chunk_tokens=chunk_tokens)
    expected = sequential_kl_computation(model, reference, rows)
    torch.testing.assert_close(stats["token_kl"].double(), expected.detach(), rtol=1e-4, atol=1e-6)
    assert (stats["token_kl"] > 0).all()
    model.zero_grad()
    stats["token_kl"].sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sequential_kl_computation(model, reference, rows).sum().backward()
    for a, b in zip(ours, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in reference.parameters())
    model.zero_grad()
    with torch.no_grad():
        _, same = sequence_logprobs(reference, batch, statistics=("token_kl",), reference=reference)
    torch.testing.assert_close(same["token_kl"], torch.zeros(4), atol=1e-6, rtol=0)
