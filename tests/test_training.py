"""Identical-condition training on a real (tiny) SFT'd Llama: improvement, β ordering, determinism,
identical batches, resume, user data, and a model loaded from a save_pretrained folder.

One short SFT model and one pair set are built per session in a temporary cache (~15 s)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

import dpobench
from dpobench.data import DataRecipe, decode_completion, make_task_data
from dpobench.logprobs import ReferenceLogps
from dpobench.metrics import TIMINGS
from dpobench.models import SFTRecipe, load_model, reference_model
from dpobench.store import Store
from dpobench.sweep import SweepConfig, SweepError, plan_cells, run_sweep
from dpobench.train import TrainConfig, batch_order, train_cell

SFT = SFTRecipe(size="tiny", steps=300, corpus=6000)
DATA = DataRecipe(train_prompts=768, heldout_prompts=64, eval_prompts=256)


def sweep(out: Path, **changes) -> pd.DataFrame:
    train = TrainConfig(steps=changes.pop("steps", 40), batch_size=32, lr=changes.pop("lr", 1e-4))
    recipe = {} if "data" in changes else {"data_recipe": DATA}  # --data's pairs are the file's, not sampled
    config = SweepConfig(sft=SFT, train=train, **recipe, **changes)
    return run_sweep(config, out, progress=lambda m: None)


@pytest.fixture(scope="session")
def beta_sweep(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("beta-sweep")
    summary = sweep(out, variants=("dpo",), betas=(0.05, 0.1, 0.5), steps=120, lr=1e-4)
    summary.attrs["out"] = out
    return summary


def test_every_cell_keeps_its_per_prompt_gold_rewards(beta_sweep: pd.DataFrame) -> None:
    """The store keeps each final evaluation's gold reward prompt by prompt (the report pairs cells by them): one
    per evaluation prompt, averaging to the cell's gold reward, in the prompts' order for every cell."""
    from dpobench.tables import read_samples

    samples = read_samples(beta_sweep.attrs["out"])
    by_cell = samples.groupby("cell_id")
    assert set(by_cell.size()) == {DATA.eval_prompts} and set(samples.cell_id) == set(beta_sweep.cell_id)
    means = by_cell.gold_reward.mean()
    for cell_id, gold in zip(beta_sweep.cell_id, beta_sweep.gold_reward, strict=True):
        assert means[cell_id] == pytest.approx(gold, abs=1e-12)
    assert (by_cell.prompt.apply(list) == [list(range(DATA.eval_prompts))] * len(means)).all()


def test_dpo_raises_the_gold_reward_beyond_noise(beta_sweep: pd.DataFrame) -> None:
    reference = beta_sweep[beta_sweep.variant == "(reference)"].iloc[0]
    dpo = beta_sweep[(beta_sweep.variant == "dpo") & (beta_sweep.beta == 0.1)].iloc[0]
    gain = dpo.gold_reward - reference.gold_reward
    se = math.hypot(dpo.gold_reward_se, reference.gold_reward_se)  # independent samples of 256 prompts each
    assert gain - 1.96 * se > 0, f"gain {gain:.3f} ± {1.96 * se:.3f}"
    assert dpo.reward_accuracy > 0.6 and dpo.status == "done"


def test_larger_beta_stays_closer_to_the_reference(beta_sweep: pd.DataFrame) -> None:
    # β = 0.05 against 0.1 is within seed noise at 120 steps (KL 1.9 / 2.1, 3.3 / 3.3 and 1.7 / 1.2 for seeds
    # 0, 1, 2), so only the tenfold steps of β are asserted; β = 0.5 stays at KL 0.4–0.6 in every seed.
    kl = beta_sweep[beta_sweep.variant == "dpo"].set_index("beta").kl_to_reference
    assert kl[0.05] > 2 * kl[0.5] and kl[0.1] > 2 * kl[0.5] and kl[0.5] > 0, kl.to_dict()


def test_same_seed_same_command_bit_identical(tmp_path: Path) -> None:
    a = sweep(tmp_path / "a", variants=("dpo", "ipo"), steps=8)
    b = sweep(tmp_path / "b", variants=("dpo", "ipo"), steps=8)
    steps_a = Store(tmp_path / "a" / "results.sqlite").frame("steps").drop(columns=list(TIMINGS), errors="ignore")
    steps_b = Store(tmp_path / "b" / "results.sqlite").frame("steps").drop(columns=list(TIMINGS), errors="ignore")
    pd.testing.assert_frame_equal(steps_a, steps_b, check_exact=True)
    cols = ["cell_id", "gold_reward", "kl_to_reference", "response_length", "heldout_reward_margin"]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True), check_exact=True)


def test_every_variant_sees_the_same_batches() -> None:
    path = reference_model(SFT)
    model, tokenizer = load_model(path)
    data = make_task_data(model, tokenizer, replace(DATA, train_prompts=128, heldout_prompts=8, eval_prompts=8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = ReferenceLogps(torch.zeros(len(data.train.pairs)), torch.zeros(len(data.train.pairs)))
    config = TrainConfig(steps=3, batch_size=8)
    batches = {}
    for name in ("dpo", "simpo", "aot"):
        result = train_cell(model, state, dpobench.get_loss(name), data.train, ref, tokenizer.pad_token_id, config, 5,
                            evaluate=lambda m, s: {"step": s})  # fmt: skip
        batches[name] = result.batches
    assert batches["dpo"] == batches["simpo"] == batches["aot"]
    assert batch_order(10, 3, 4, seed=1)[0].tolist() != batch_order(10, 3, 4, seed=2)[0].tolist()


def test_rerun_skips_finished_cells(tmp_path: Path) -> None:
    first = sweep(tmp_path, variants=("dpo",), steps=5)
    finished = Store(tmp_path / "results.sqlite").frame("cells").set_index("cell_id").finished
    second = sweep(tmp_path, variants=("dpo", "hinge"), steps=5)
    cells = Store(tmp_path / "results.sqlite").frame("cells").set_index("cell_id")
    assert len(first) == 2 and len(second) == 3  # (reference) + dpo, then + hinge
    assert (cells.finished[finished.index] == finished).all()  # dpo was not trained again
    assert set(cells.variant) == {"(reference)", "dpo", "hinge"}
    third = sweep(tmp_path, variants=("hinge",), steps=5)  # the summary is this command's cells, not the store's
    assert sorted(third.variant) == ["(reference)", "hinge"]


def test_step_costs_are_measured_side_by_side_once_per_configuration(tmp_path: Path) -> None:
    """After its cells, a sweep times each configuration (variant and parameters; β changes no step) on one batch
    in interleaved rounds: three variants × two β are three configurations × the rounds asked for. A rerun that
    trains nothing (and finds every configuration measured) measures nothing; one that trains measures its own
    configurations side by side; --step-cost-rounds 0 measures nothing."""
    sweep(tmp_path, variants=("dpo", "ipo", "aot"), betas=(0.1, 0.5), steps=2, step_cost_rounds=6)
    costs = Store(tmp_path / "results.sqlite").step_costs()
    assert (
        sorted(costs.variant.unique()) == ["aot", "dpo", "ipo"]
        and (costs.groupby("variant").params.nunique() == 1).all()
    )
    assert not costs.params.str.contains('"beta"').any()  # a configuration's parameters but β
    assert costs.groupby("variant")["round"].apply(sorted).tolist() == [list(range(6))] * 3
    assert (costs.step_time_ms > 0).all() and costs.run_id.nunique() == 1
    sweep(tmp_path, variants=("dpo", "ipo", "aot"), betas=(0.1, 0.5), steps=2, step_cost_rounds=6)
    assert len(Store(tmp_path / "results.sqlite").step_costs()) == 18  # nothing trained, nothing measured
    sweep(tmp_path, variants=("dpo", "hinge"), steps=2, step_cost_rounds=6)  # hinge trains: both measured anew
    latest = Store(tmp_path / "results.sqlite").step_costs().groupby("run_id").variant.unique().iloc[-1]
    assert sorted(latest) == ["dpo", "hinge"]
    sweep(tmp_path / "none", variants=("dpo", "ipo"), steps=2, step_cost_rounds=0)
    assert Store(tmp_path / "none" / "results.sqlite").step_costs().empty


def test_provenance_on_every_cell(tmp_path: Path) -> None:
    sweep(tmp_path, variants=("cdpo",), steps=3)
    store = Store(tmp_path / "results.sqlite")
    cell = store.frame("cells").query("variant == 'cdpo'").iloc[0]
    assert (cell.plugin, cell.plugin_version, cell.seed, cell.scenario, cell.device, cell["dtype"]) == (
        "dpo", dpobench.__version__, 0, "clean", "cpu", "float32")  # fmt: skip
    assert json.loads(cell.params)["label_smoothing"] == 0.1 and cell.beta == 0.1
    run = store.frame("runs").iloc[0]
    assert run.torch_version == torch.__version__ and run.model_hash and run.data_hash
    assert len(store.frame("steps").query(f"cell_id == '{cell.cell_id}'")) == 3


def test_the_evaluation_scores_the_samples_it_draws() -> None:
    """The evaluator's sample metrics, recomputed here from the same samples (drawn again with its seed, seed + 1000)
    without its helpers: the gold reward, the grammatical share, the repetitive share (a quarter or more of a sample's
    word 3-grams repeat an earlier one) and distinct-2 (unique word bigrams of all samples over all)."""
    from dpobench.data import sample_completions
    from dpobench.task import gold_reward, is_grammatical
    from dpobench.train import Evaluator

    model, tokenizer = load_model(reference_model(SFT))
    data = make_task_data(model, tokenizer, replace(DATA, train_prompts=32, heldout_prompts=8, eval_prompts=96))
    metrics = Evaluator(model, tokenizer, data, heldout_reference=None)(model, step=0, loss=None, seed=0)
    drawn = sample_completions(model, tokenizer, data.eval_prompts, samples=1, max_new_tokens=48, seed=1000)
    texts = [decode_completion(tokenizer, s[0]) for s in drawn]
    words = [t.lower().split() for t in texts]
    trigrams = [[tuple(w[i : i + 3]) for i in range(len(w) - 2)] for w in words]
    loops = [bool(g) and 1 - len(set(g)) / len(g) >= 0.25 for g in trigrams]
    bigrams = [tuple(w[i : i + 2]) for w in words for i in range(len(w) - 1)]
    assert metrics["n_samples"] == 96 and metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["gold_samples"] == pytest.approx([gold_reward(t) for t in texts])
    assert metrics["grammatical_fraction"] == pytest.approx(sum(map(is_grammatical, texts)) / 96)
    assert metrics["repetitive_fraction"] == pytest.approx(sum(loops) / 96)
    assert metrics["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams))
    assert 0 < metrics["distinct_2"] < 1  # the SFT model's reviews share bigrams ("the food", "was great")


def test_user_data_file_without_gold_reward(tmp_path: Path) -> None:
    model, tokenizer = load_model(reference_model(SFT))
    data = make_task_data(model, tokenizer, replace(DATA, train_prompts=96, heldout_prompts=8, eval_prompts=8))
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for p in data.train.pairs:
            if len(p.chosen) < 2 or len(p.rejected) < 2:  # an empty completion is invalid user data
                continue
            row = {"prompt": tokenizer.decode(p.prompt, skip_special_tokens=True),
                   "chosen": decode_completion(tokenizer, p.chosen), "rejected": decode_completion(tokenizer, p.rejected),
                   "weight": 0.5}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    summary = sweep(tmp_path / "out", variants=("seed_custom_dpo",), data=str(path), steps=3)
    row = summary[summary.variant == "seed_custom_dpo"].iloc[0]
    assert math.isnan(row.gold_reward) and math.isnan(row.grammatical_fraction)  # omitted, never faked
    assert math.isfinite(row.kl_to_reference) and row.response_length > 0 and row.status == "done"


def test_model_from_a_save_pretrained_folder(tmp_path: Path) -> None:
    model, tokenizer = load_model(reference_model(SFT))
    folder = tmp_path / "my-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    summary = sweep(tmp_path / "out", variants=("dpo",), model=str(folder), steps=3)
    assert summary[summary.variant == "dpo"].iloc[0].status == "done"
    assert Store(tmp_path / "out" / "results.sqlite").frame("runs").iloc[0].model == str(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variants": ("dpoo",)}, "unknown loss variant 'dpoo'; did you mean 'dpo'?"),
        ({"betas": (0.0,)}, "every β must be > 0"),
        ({"seeds": (0, -1)}, "seed -1: seeds must be ≥ 0 (each is one fixed seed; none means random)"),
        ({"train": TrainConfig(lr=0.0)}, "lr = 0: must be > 0 (at 0 every cell would stay the reference model)"),
        ({"scenarios": ("dirty",)}, "unknown scenario 'dirty'"),
        (
            {"variants": ("dpo",), "scenarios": ("clean", "unpaired-1:10")},
            "--scenarios unpaired-1:10: only unpaired variants (apo_zero_unpaired, bco, kto) train there, and none of this "
            "sweep's variants is one",
        ),
        ({"device": "cuda"}, "--device cuda: no CUDA GPU is visible"),
    ],
)
def test_bad_sweep_settings_fail_before_training(tmp_path: Path, changes: dict, message: str) -> None:
    if "device" in changes and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises((SweepError, dpobench.UnknownLossError)) as info:
        run_sweep(SweepConfig(sft=SFT, data_recipe=DATA, **changes), tmp_path, progress=lambda m: None)
    assert message in str(info.value)
    assert not (tmp_path / "results.sqlite").exists()


def test_bradley_terry_labels_are_noisy_where_rewards_are_close() -> None:
    model, tokenizer = load_model(reference_model(SFT))
    recipe = replace(DATA, train_prompts=400, heldout_prompts=8, eval_prompts=8)
    hard = make_task_data(model, tokenizer, recipe).train.pairs
    bt = make_task_data(model, tokenizer, replace(recipe, labels="bt")).train.pairs
    assert all(p.chosen_gold > p.rejected_gold for p in hard)
    inverted = [p for p in bt if p.chosen_gold < p.rejected_gold]
    # σ(Δ/0.1) labels: some pairs are flipped, and those are the close ones.
    assert 0 < len(inverted) < 0.25 * len(bt)
    assert max(p.rejected_gold - p.chosen_gold for p in inverted) < 0.5


def test_sampled_pairs_are_cached_per_model_recipe_and_device(tmp_path: Path) -> None:
    """The second sweep start reads the pairs the first sampled (it never touches the model: here there is none);
    another recipe samples anew; an entry that cannot be read is sampled anew, to the same pairs."""
    from dpobench.data import cached_task_data

    model, tokenizer = load_model(reference_model(SFT))
    recipe = replace(DATA, train_prompts=48, heldout_prompts=8, eval_prompts=8)
    said: list[str] = []
    first = cached_task_data(model, tokenizer, recipe, model_fingerprint="m1", cache_dir=tmp_path, device="cpu",
                             progress=said.append)  # fmt: skip
    assert first == make_task_data(model, tokenizer, recipe)  # what the cache keeps is what sampling gives
    again = cached_task_data(None, tokenizer, recipe, model_fingerprint="m1", cache_dir=tmp_path, device="cpu",
                             progress=said.append)  # fmt: skip
    assert again == first and len(said) == 1 and said[0].startswith("sampling preference pairs")
    other = replace(recipe, seed=1)
    assert cached_task_data(model, tokenizer, other, model_fingerprint="m1", cache_dir=tmp_path, device="cpu") != first
    (entry,) = [f for f in (tmp_path / "pairs").iterdir() if json.loads(f.read_text())["info"]["recipe"]["seed"] == 0]
    entry.write_text('{"train": ')  # a write cut short
    assert cached_task_data(model, tokenizer, recipe, model_fingerprint="m1", cache_dir=tmp_path, device="cpu") == first
    with pytest.raises(AttributeError):  # another model's fingerprint is another entry: it samples (and has no model)
        cached_task_data(None, tokenizer, recipe, model_fingerprint="m2", cache_dir=tmp_path, device="cpu")


def test_a_cells_progress_label_names_its_beta_only_where_it_has_one() -> None:
    from dpobench.cells import Cell
    from dpobench.sweep import _label

    spec = dpobench.get_losses()["dpo"]
    config = SweepConfig(params={"dpo": {"label_smoothing": ("0.1",)}})
    with_beta = Cell(spec, spec.build(beta=0.5, label_smoothing=0.1), 0.5, 2, "noisy")
    assert _label(config, with_beta, 3, 12) == "[3/12] dpo β=0.5 seed=2 noisy label_smoothing=0.1"
    without = Cell(spec, spec.build(), math.nan, 0, "clean")  # a variant without β (KTO-style plugins)
    assert _label(SweepConfig(), without, 1, 1) == "[1/1] dpo seed=0 clean"


def test_a_variants_own_beta_replaces_the_swept_betas_for_it_alone() -> None:
    """``--param simpo.beta=2`` gives SimPO its paper's β while the others sweep ``--betas``; it was once overridden
    by ``--betas`` without a word. A β that is not a number > 0 is refused before anything trains."""
    registry = dpobench.get_losses()
    specs = [registry["dpo"], registry["simpo"]]
    config = SweepConfig(variants=("dpo", "simpo"), betas=(0.1, 0.5), seeds=(0,), params={"simpo": {"beta": ("2",)}})
    cells = {(cell.spec.name, cell.beta, cell.loss.hparams["beta"]) for cell in plan_cells(config, specs)}
    assert cells == {("dpo", 0.1, 0.1), ("dpo", 0.5, 0.5), ("simpo", 2.0, 2.0)}
    for bad in ("0", "-1", "two"):
        with pytest.raises(SweepError, match=rf"--param simpo.beta='{bad}': β must be a number > 0"):
            plan_cells(replace(config, params={"simpo": {"beta": (bad,)}}), specs)


def test_a_variant_without_beta_trains_once_whatever_the_betas() -> None:
    """SimPER and best-of-N have no β: with three β swept they were planned three times, as three identical cells
    (one identity) that each trained."""
    from dpobench.methods import resolve_names

    registry = dpobench.get_losses()
    _, methods = resolve_names(("best_of_n",), registry)
    config = SweepConfig(variants=("simper", "dpo", "best_of_n"), betas=(0.05, 0.1, 0.5), seeds=(0, 1))
    cells = plan_cells(config, [registry["simper"], registry["dpo"], methods["best_of_n"]])
    counts = Counter(cell.spec.name for cell in cells)
    assert counts == {"simper": 2, "dpo": 6, "best_of_n": 2}
    assert all(math.isnan(cell.beta) for cell in cells if cell.spec.name != "dpo")


def test_a_cell_run_alone_from_the_plan_equals_its_cell_in_the_sweep(tmp_path: Path, untrained_model: Path) -> None:
    """The seam another executor uses: ``plan_sweep`` → ``prepare`` → ``run_cell(prepared, cell)``, for one cell
    alone, gives that cell's metrics exactly as the whole sweep stored them (same process, same threads)."""
    from dpobench.cells import run_cell
    from dpobench.sweep import plan_sweep, prepare
    from dpobench.tables import cell_finals, read_tidy

    config = SweepConfig(variants=("dpo", "ipo"), model=str(untrained_model), data_recipe=replace(DATA, train_prompts=96),
                         train=TrainConfig(steps=3, batch_size=8))  # fmt: skip
    run_sweep(config, tmp_path, progress=lambda m: None)
    stored = cell_finals(read_tidy(tmp_path)).set_index("variant")
    prepared = prepare(plan_sweep(config), progress=lambda m: None)
    ipo = next(cell for cell in prepared.plan.cells if cell.spec.name == "ipo")
    result = run_cell(prepared, ipo)
    assert result.status == "done" and len(result.steps) == 3
    final = result.evaluations[-1]
    for metric in ("gold_reward", "kl_to_reference", "response_length", "heldout_reward_accuracy"):
        assert final[metric] == stored.loc["ipo", metric], metric
    assert result.steps[-1]["loss"] == stored.loc["ipo", "loss"]  # one step in the last tenth of 3

    # an executor may return cells in any order (as one running them elsewhere does): the driver commits each as it
    # arrives, and the store holds the same cells with the same numbers
    from dpobench.cells import run_in_process

    def backwards(prepared, pending, cell_progress, should_stop):  # the last cell first
        yield from run_in_process(prepared, pending[::-1], cell_progress, should_stop)

    run_sweep(config, tmp_path / "backwards", progress=lambda m: None, executor=backwards)
    again = cell_finals(read_tidy(tmp_path / "backwards")).set_index("variant")
    timing = [*TIMINGS, "run_id"]
    pd.testing.assert_frame_equal(again.drop(columns=timing).sort_index(), stored.drop(columns=timing).sort_index())


def test_cells_train_side_by_side_where_one_cannot_use_the_cores(untrained_model: Path) -> None:
    """By default, cells of a model under 1 M trainable parameters train side by side on the CPU, one per core (its
    step cannot use several); a larger model, a compiled step, another device or cells of under 50 steps train one
    at a time; an asked
    count is taken as given. Side by side needs the CPU, eager layers and the in-process executor."""
    import os
    from types import SimpleNamespace

    from dpobench.cells import cells_at_once
    from dpobench.config import ExecutorOptions, check_executor, load_config
    from dpobench.sweep import plan_sweep

    tiny, _ = load_model(untrained_model)
    large = torch.nn.Linear(1000, 1000)  # 1,001,000 parameters

    def at_once(policy, device="cpu", compile=False, asked=0, steps=150) -> int:
        config = SweepConfig(executor=ExecutorOptions(parallel_cells=asked), train=TrainConfig(steps=steps))
        return cells_at_once(SimpleNamespace(config=config, policy=policy, plan=SimpleNamespace(device=device),
                                             acceleration=SimpleNamespace(compile=compile)))  # fmt: skip

    cores = len(os.sched_getaffinity(0))
    assert at_once(tiny) == cores and at_once(large) == 1
    assert at_once(tiny, compile=True) == 1 and at_once(tiny, device="cuda") == 1 and at_once(tiny, steps=49) == 1
    assert at_once(large, asked=3) == 3 and at_once(tiny, asked=1) == 1
    assert load_config({"parallel_cells": "auto"}).executor.parallel_cells == 0
    assert load_config({"parallel_cells": "2"}).executor.parallel_cells == 2
    with pytest.raises(SweepError, match=r"parallel_cells = '0': must be ≥ 1"):
        load_config({"parallel_cells": "0"})
    with pytest.raises(SweepError, match=r"--parallel-cells 2: cells train side by side only on the CPU and eagerly "
                       r"\(--compile is on\); use --parallel-cells 1"):  # fmt: skip
        plan_sweep(load_config({"parallel_cells": 2, "compile": True, "device": "cpu"}))
    with pytest.raises(SweepError, match=r"--parallel-cells 2: trains cells side by side in this process; with "
                       r"--executor ray each cell is a task"):  # fmt: skip
        check_executor(load_config({"executor": "ray", "parallel_cells": 2}).executor)
