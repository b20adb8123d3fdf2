"""The inputs beyond summed log-probs, through a real sweep: per-token log-probs, score margins, state across steps
and unpaired examples (issue 22's harness), and the unpaired scenarios' data."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

import dpobench
from dpobench.config import ExecutorOptions
from dpobench.data import DataError, Pair, PairSet, apply_scenario, decode_completion, desirable_ratio, unroll
from dpobench.losses import Completions
from dpobench.metrics import TIMINGS
from dpobench.store import Store
from dpobench.sweep import SweepConfig, SweepError, plan_cells, run_sweep
from dpobench.train import TrainConfig

from .test_training import DATA, SFT

#: enough pairs for 4 steps of 16 and a 1:4 thinning, few evaluation prompts: the sweep below is about inputs
SMALL = replace(DATA, train_prompts=160, heldout_prompts=16, eval_prompts=16)


def pairs(n: int) -> PairSet:
    return PairSet([Pair((1, i), (10 + i, 2), (50 + i, 2)) for i in range(n)])


def test_unrolling_keeps_every_completion_once_and_thins_the_plentiful_side() -> None:
    """1:1 is every chosen completion desirable and every rejected one not; 1:4 keeps the 20 undesirable examples
    and round(20/4) = 5 desirable ones; 3:1 the other way. Each KL completion is another example's, all of them once
    (one cycle)."""
    base = pairs(20)
    even = unroll(base)
    assert sorted(e.completion for e in even.examples if e.desirable) == sorted(p.chosen for p in base.pairs)
    assert sorted(e.completion for e in even.examples if not e.desirable) == sorted(p.rejected for p in base.pairs)
    for ratio, (good, bad) in (((1, 4), (5, 20)), ((3, 1), (20, 7))):
        thin = unroll(base, ratio)
        assert (sum(e.desirable for e in thin.examples), sum(not e.desirable for e in thin.examples)) == (good, bad)
    kl = [e.kl_completion for e in even.examples]
    assert sorted(kl) == sorted(e.completion for e in even.examples)
    assert all(e.kl_completion != e.completion for e in even.examples)
    assert unroll(base, (1, 4)).fingerprint() == unroll(base, (1, 4)).fingerprint()  # the same for every cell
    assert desirable_ratio("unpaired-1:10") == (1, 10) and desirable_ratio("clean") is None
    assert desirable_ratio("unpaired-0:1") is None and apply_scenario(base, "unpaired-1:10") is base
    with pytest.raises(DataError, match=r"unknown scenario 'unpaired'; .* or unpaired-D:U"):
        apply_scenario(base, "unpaired")
    with pytest.raises(DataError, match=r"unpaired-1:50: 20 pairs keep no desirable example at that ratio"):
        unroll(base, (1, 50))


def test_a_moving_reference_is_refused_with_lora() -> None:
    """Mixing LoRA's factors A and B one by one does not mix the weights they make (TRL refuses a synced reference
    with PEFT too): named, TR-DPO is refused before training; among all variants, it is left out, saying why."""
    from dpobench.config import LoraOptions
    from dpobench.data import TaskData
    from dpobench.sweep import _cells_with_their_inputs, plan_sweep

    data = TaskData(pairs(4), pairs(2), [], has_gold=True)
    data.train.pairs[:] = [replace_margin(p) for p in data.train.pairs]
    data.heldout.pairs[:] = [replace_margin(p) for p in data.heldout.pairs]
    said: list[str] = []
    kept = _cells_with_their_inputs(plan_sweep(SweepConfig(lora=LoraOptions(enabled=True))), data, said.append)
    assert "tr_dpo" not in {c.spec.name for c in kept.cells} and "odpo" in {c.spec.name for c in kept.cells}
    assert said == ["tr_dpo left out: it moves its reference toward the policy, which LoRA adapters cannot do by "
                    "mixing their factors; run it without --lora"]  # fmt: skip
    named = plan_sweep(SweepConfig(lora=LoraOptions(enabled=True), variants=("dpo", "tr_dpo")))
    with pytest.raises(SweepError, match=r"tr_dpo moves its reference toward the policy.*or drop it from --variants"):
        _cells_with_their_inputs(named, data, said.append)


def replace_margin(pair: Pair, margin: float = 1.0) -> Pair:
    from dataclasses import replace

    return replace(pair, margin=margin)


def test_unpaired_scenarios_train_only_the_unpaired_variants() -> None:
    registry = dpobench.get_losses()
    config = SweepConfig(scenarios=("clean", "unpaired-1:10"))
    cells = plan_cells(config, [registry[n] for n in ("dpo", "kto")])
    assert sorted((c.spec.name, c.scenario) for c in cells) == [
        ("dpo", "clean"), ("kto", "clean"), ("kto", "unpaired-1:10")]  # fmt: skip


def test_kto_on_pairs_is_the_mean_of_its_two_examples_losses() -> None:
    """Where only pairs exist (contract check, landscape, held-out rewards), an unpaired loss sees them unrolled: a
    pair's loss is the mean of its examples' and its rewards are theirs. KTO at β = 1 on one pair with Δc = 1,
    Δr = −1 and mismatched log-ratios (the rotated own ones) with mean 0: z₀ = 0, so
    ℓ = ½·[(1 − σ(1)) + (1 − σ(1))]."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    policy = dpobench.LogProbs(t(-10.0), t(-12.0), t(5.0), t(4.0))
    reference = dpobench.LogProbs(t(-11.0), t(-11.0), t(5.0), t(4.0))
    out = dpobench.losses.call_loss(dpobench.get_loss("kto", beta=1.0), policy, reference)
    sigma = 1 / (1 + math.exp(-1))
    assert out.losses.tolist() == pytest.approx([1 - sigma])
    assert (out.chosen_rewards.tolist(), out.rejected_rewards.tolist()) == ([1.0], [-1.0])
    with pytest.raises(ValueError, match=r"Completions\.desirable must be bool"):
        Completions(t(1.0), t(1.0), t(1.0))


def test_a_sweep_trains_every_kind_of_input(tmp_path: Path) -> None:
    """One sweep: per-token (LD-DPO, SamPO), the sequential KL (TDPO), margins (ODPO), state (β-DPO, BCO), a moving
    reference (TR-DPO) and unpaired (KTO, on the pairs unrolled and on 1:4 examples) cells all train, two side by
    side; the ones that draw at random or keep state are reproducible whatever trains beside them: a second sweep of
    them, one at a time on one thread, gives the same steps and evaluations bit for bit. KTO's steps report each
    side's rewards and no reward accuracy (it has no pairs); unpaired step costs are measured beside the paired ones."""
    variants = ("dpo", "ld_dpo", "sampo", "tdpo", "odpo", "beta_dpo", "tr_dpo", "kto", "bco")

    def run(out: Path, names: tuple[str, ...], parallel_cells: int):
        train = TrainConfig(steps=4, batch_size=16)
        config = SweepConfig(sft=SFT, data_recipe=SMALL, train=train, variants=names, step_cost_rounds=2,
                             scenarios=("clean", "unpaired-1:4"),
                             executor=ExecutorOptions(parallel_cells=parallel_cells))  # fmt: skip
        run_sweep(config, out, progress=lambda m: None)
        return Store(out / "results.sqlite")

    first = run(tmp_path / "a", variants, parallel_cells=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the side-by-side cells had
    try:
        second = run(tmp_path / "b", ("sampo", "beta_dpo", "kto"), parallel_cells=1)
    finally:
        torch.set_num_threads(threads)
    cells = first.frame("cells").query("role != 'reference'")
    assert sorted(zip(cells.variant, cells.scenario, strict=True)) == sorted(
        [(v, "clean") for v in variants] + [("kto", "unpaired-1:4"), ("bco", "unpaired-1:4")]
    )
    assert (cells.status == "done").all(), cells[["variant", "error"]]
    timing = list(TIMINGS)
    for table in ("steps", "evaluations"):
        again = second.frame(table)
        again = again[again.cell_id.isin(cells.cell_id)]  # not the reference's evaluation
        same = first.frame(table)
        same = same[same.cell_id.isin(again.cell_id)]
        assert len(again) == {"steps": 4 * 4, "evaluations": 4}[table]  # SamPO, β-DPO, KTO on both scenarios
        again, same = (t.drop(columns=[c for c in timing if c in t]).sort_values(["cell_id", "step"])
                       .reset_index(drop=True) for t in (again, same))  # fmt: skip
        pd.testing.assert_frame_equal(same, again, check_exact=True)
    steps = first.frame("steps")
    kto = steps[steps.cell_id.isin(cells[cells.variant == "kto"].cell_id)]
    assert kto.reward_accuracy.isna().all() and kto.chosen_reward.notna().all() and kto.rejected_reward.notna().all()
    assert set(first.step_costs().variant) == set(variants)


def test_margins_come_from_the_data_file_or_the_variant_is_left_out(tmp_path: Path) -> None:
    """A data file's `margin` (or score_chosen − score_rejected) feeds ODPO; without margins, a named ODPO is
    refused before training (naming a bad row, if one is why) and an unnamed one (all variants) left out; the file
    stays good for the variants that do not read margins."""
    from dpobench.data import load_pairs_file, make_task_data
    from dpobench.models import load_model, reference_model

    model, tokenizer = load_model(reference_model(SFT))
    from dataclasses import replace

    data = make_task_data(model, tokenizer, replace(DATA, train_prompts=48, heldout_prompts=4, eval_prompts=4))
    rows = [{"prompt": tokenizer.decode(p.prompt, skip_special_tokens=True),
             "chosen": decode_completion(tokenizer, p.chosen), "rejected": decode_completion(tokenizer, p.rejected)}
            for p in data.train.pairs if len(p.chosen) > 1 and len(p.rejected) > 1]  # fmt: skip
    plain, scored, negative = (tmp_path / name for name in ("plain.jsonl", "scored.jsonl", "negative.jsonl"))
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored.write_text("".join(json.dumps({**r, "score_chosen": 7.5, "score_rejected": 7.0 - i % 3}) + "\n"
                              for i, r in enumerate(rows)))  # fmt: skip
    negative.write_text(json.dumps({**rows[0], "margin": -1}) + "\n" + json.dumps(rows[1]) + "\n")
    loaded = load_pairs_file(scored, tokenizer, max_length=256)
    assert sorted({p.margin for p in (*loaded.train.pairs, *loaded.heldout.pairs)}) == [0.5, 1.5, 2.5]
    bad = load_pairs_file(negative, tokenizer, max_length=256)  # good for every variant that does not read margins
    assert sum(math.isnan(p.margin) for p in (*bad.train.pairs, *bad.heldout.pairs)) == 2
    problem = "negative.jsonl:line 1: margin is -1.0; a margin is a finite number ≥ 0 (the chosen completion scored at "
    assert bad.info["margin_problem"].endswith(problem + "least as high as the rejected one)")
    from dpobench.sweep import _cells_with_their_inputs, plan_sweep

    said: list[str] = []
    every = plan_sweep(SweepConfig(data=str(plain)))  # no --variants: every variant
    kept = _cells_with_their_inputs(every, load_pairs_file(plain, tokenizer, max_length=256), said.append)
    assert {c.spec.name for c in every.cells} - {c.spec.name for c in kept.cells} == {"odpo"}
    assert said == [f"odpo left out: it reads each pair's score margin, and these pairs have none (give every row of "
                    f"{plain} a `margin`, or `score_chosen` and `score_rejected`)"]  # fmt: skip
    train = TrainConfig(steps=2, batch_size=8)
    for source, why in ((plain, "these pairs have none"), (negative, re.escape(problem))):
        with pytest.raises(SweepError, match=rf"odpo reads each pair's score margin, and .*{why}.*or drop it from"):
            run_sweep(SweepConfig(sft=SFT, variants=("odpo",), data=str(source), train=train), tmp_path / "x",
                      progress=lambda m: None)  # fmt: skip
    summary = run_sweep(SweepConfig(sft=SFT, variants=("odpo",), data=str(scored), train=train), tmp_path / "y",
                        progress=lambda m: None)  # fmt: skip
    assert summary[summary.variant == "odpo"].status.tolist() == ["done"]


def test_tr_dpo_moves_its_own_reference_toward_the_policy(untrained_model: Path) -> None:
    """TR-DPO with τ = 2, α = 0.5: its first two steps are DPO's against the cached reference (the same model), then
    its reference is ½·(reference + policy after step 2), parameter by parameter; the shared reference weights are
    untouched. Step 3's loss is DPO's loss against that mixed model's log-probs, computed here independently."""
    import copy

    from dpobench.data import Pair
    from dpobench.logprobs import collate_shared, reference_logprobs, sequence_logprobs
    from dpobench.models import load_model
    from dpobench.train import CellTrainer

    from .test_fast_path import random_pairs

    policy, tokenizer = load_model(untrained_model)
    reference = copy.deepcopy(policy).eval()
    pad = tokenizer.pad_token_id
    data = random_pairs(32, len(tokenizer))
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    cached = reference_logprobs(reference, data, pad, device="cpu")
    config = TrainConfig(steps=3, batch_size=8, lr=1e-2)
    runs = {}
    for name, params in (("dpo", {}), ("tr_dpo", {"sync_every": 2, "mix": 0.5})):
        trainer = CellTrainer(policy, state, dpobench.get_loss(name, **params), PairSet(data), cached, pad, config,
                              seed=0)  # fmt: skip
        runs[name] = [trainer.step()["loss"] for _ in range(2)]
        if name == "tr_dpo":
            after_two = {k: v.clone() for k, v in policy.state_dict().items()}
            for key, moved in trainer.reference_copy.state_dict().items():
                torch.testing.assert_close(moved, 0.5 * state[key] + 0.5 * after_two[key])
            batch = trainer.order[2]
            pairs = [data[i] for i in batch.tolist()]
            with torch.no_grad():
                sums, _ = sequence_logprobs(trainer.reference_copy, collate_shared(pairs, pad))
                mine, _ = sequence_logprobs(policy, collate_shared(pairs, pad))
            h = (mine[:8] - sums[:8]) - (mine[8:] - sums[8:])
            expected = torch.nn.functional.softplus(-0.1 * h).mean().item()
            assert trainer.step(batch)["loss"] == pytest.approx(expected, rel=1e-4)
    assert runs["tr_dpo"] == pytest.approx(runs["dpo"], rel=1e-5)  # the first two steps: the same reference
    for key, value in reference.state_dict().items():
        assert torch.equal(value, state[key])
    assert isinstance(data[0], Pair)


def test_a_file_of_unpaired_rows_trains_the_unpaired_variants(tmp_path: Path) -> None:
    """TRL's unpaired format (prompt, completion, label), as JSONL or CSV: the training rows are the examples, kept
    whole at the file's own ratio (an unpaired-D:U scenario thins them), each KL completion another example's; the
    held-out rows' prompts are the evaluation prompts. Paired variants cannot train on it: left out in one line, or
    refused when named. Bad rows are one line naming the row."""
    from dpobench.data import load_pairs_file, make_task_data, scenario_examples
    from dpobench.models import load_model, reference_model
    from dpobench.sweep import _cells_with_their_inputs, plan_sweep

    model, tokenizer = load_model(reference_model(SFT))
    data = make_task_data(model, tokenizer, replace(DATA, train_prompts=48, heldout_prompts=4, eval_prompts=4))
    text = lambda ids: decode_completion(tokenizer, ids)  # noqa: E731
    rows = []
    for i, p in enumerate(p for p in data.train.pairs if len(p.chosen) > 1 and len(p.rejected) > 1):
        prompt = tokenizer.decode(p.prompt, skip_special_tokens=True)
        rows.append({"prompt": prompt, "completion": text(p.chosen), "label": True})
        if i % 2 == 0:  # about two desirable rows for each undesirable one
            rows.append({"prompt": prompt, "completion": text(p.rejected), "label": False})
    jsonl, csv_file = tmp_path / "unpaired.jsonl", tmp_path / "unpaired.csv"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame([{**r, "label": ["false", "1"][r["label"]] if i % 3 else str(r["label"]).lower()}
                  for i, r in enumerate(rows)]).to_csv(csv_file, index=False)  # fmt: skip

    loaded = load_pairs_file(jsonl, tokenizer, max_length=256)
    n, held = len(rows), round(0.1 * len(rows))
    assert loaded.examples is not None and not loaded.train.pairs and not loaded.heldout.pairs
    examples = loaded.examples.examples
    assert len(examples) == n - held and loaded.info["examples"] == n
    desirable = sum(e.desirable for e in examples)
    assert (loaded.info["desirable"], loaded.info["undesirable"]) == (desirable, n - held - desirable)
    from dpobench.data import encode_completion, encode_prompt

    encoded = [(tuple(encode_prompt(tokenizer, r["prompt"])), tuple(encode_completion(tokenizer, r["completion"])),
                r["label"]) for r in rows]  # fmt: skip
    assert all(
        (e.prompt, e.completion, e.desirable) in encoded for e in examples
    )  # each a row of the file, as labelled
    assert sorted(e.kl_completion for e in examples) == sorted(e.completion for e in examples)  # one cycle
    assert 1 <= len(loaded.eval_prompts) <= held  # the held-out rows' prompts, each once
    assert load_pairs_file(csv_file, tokenizer, max_length=256).fingerprint() == loaded.fingerprint()
    # unpaired-1:1 keeps the smaller side whole and thins the other to its size
    even = scenario_examples(loaded, PairSet([]), "unpaired-1:1").examples
    smaller = min(desirable, len(examples) - desirable)
    assert (sum(e.desirable for e in even), sum(not e.desirable for e in even)) == (smaller, smaller)
    assert scenario_examples(loaded, PairSet([]), "clean") is loaded.examples

    bad = {"label.jsonl": ({**rows[0], "label": "yes"}, "line 1: label 'yes' is not a boolean; write true"),
           "mixed.jsonl": ({"prompt": "a", "chosen": "b", "rejected": "c"}, "line 2: expected prompt, completion and "
                           "label, as the file's first row has"),
           "one-label.jsonl": (None, "its training rows need both labels; ")}  # fmt: skip
    for name, (row, message) in bad.items():
        lines = [row, rows[1]] if name == "label.jsonl" else [rows[0], row] if row else [r for r in rows if r["label"]]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
        with pytest.raises(DataError, match=re.escape(message)):
            load_pairs_file(tmp_path / name, tokenizer, max_length=256)

    said: list[str] = []
    plan = plan_sweep(SweepConfig(data=str(jsonl)))  # every variant
    kept = _cells_with_their_inputs(plan, loaded, said.append)
    assert {c.spec.name for c in kept.cells} == {"kto", "bco", "apo_zero_unpaired"}
    assert said == [f"{len({c.spec.name for c in plan.cells}) - 3} paired variants left out: {jsonl} holds unpaired "
                    "rows, which only unpaired variants (apo_zero_unpaired, bco, kto) train on"]  # fmt: skip
    train = TrainConfig(steps=2, batch_size=4)
    with pytest.raises(SweepError, match=r"^dpo trains on pairs, and .* holds unpaired rows \(prompt, completion, "):
        run_sweep(SweepConfig(sft=SFT, variants=("dpo", "kto"), data=str(jsonl), train=train), tmp_path / "x",
                  progress=lambda m: None)  # fmt: skip
    summary = run_sweep(SweepConfig(sft=SFT, variants=("kto",), data=str(jsonl), train=train,
                                    scenarios=("clean", "unpaired-1:1"), step_cost_rounds=0),
                        tmp_path / "y", progress=said.append)  # fmt: skip
    assert summary.status.tolist() == ["done"] * 3 and sorted(summary.scenario) == ["clean", "clean", "unpaired-1:1"]
    assert set(summary.n_samples) == {len(loaded.eval_prompts)}
    assert any(m.startswith(f"{n - held} training examples ({desirable} desirable, {n - held - desirable} undesirable)")
               for m in said)  # fmt: skip
    from dpobench.report import build_report

    section = {s.id: s for s in build_report(tmp_path / "y").sections}["unpaired"]
    assert list(section.tables[0][1].data) == ["the file's rows", "unpaired-1:1"]
    assert "the data file's own unpaired rows, in clean at the file's desirable:undesirable ratio" in section.text
