"""The methods beyond offline losses (``dpobench.methods``) and their reward model: each estimator against hand-worked
values, the reward model against an independent reading of its weights, and a 2-step sweep of every method."""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpobench.config import ExecutorOptions, SweepConfig, TrainConfig
from dpobench.data import DataRecipe
from dpobench.methods import (
    gae,
    grpo_advantages,
    k3_kl,
    method_spec,
    ppo_policy_loss,
    ppo_value_loss,
    resolve_names,
    rloo_advantages,
)
from dpobench.models import SFTRecipe
from dpobench.plugins import get_losses
from dpobench.registry import UnknownLossError
from dpobench.reward_model import bradley_terry_loss, spearman
from dpobench.sweep import Progress, SweepInterrupted, run_sweep
from dpobench.tables import read_tidy
from dpobench.train import best_of_n_kl

SFT = SFTRecipe(size="tiny", steps=300, corpus=6000)
DATA = DataRecipe(train_prompts=768, heldout_prompts=64, eval_prompts=64)
METHODS = ("dpo", "rloo", "grpo", "ppo", "online_dpo", "best_of_n")


def config(**changes) -> SweepConfig:
    return SweepConfig(sft=SFT, data_recipe=DATA, train=TrainConfig(steps=2, batch_size=8), step_cost_rounds=0,
                       **changes)  # fmt: skip


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """Two steps of every method, and best-of-1 and best-of-4."""
    out = tmp_path_factory.mktemp("methods")
    run_sweep(config(variants=METHODS, params={"best_of_n": {"n": (1, 4)}}), out, progress=lambda m: None)
    return out


def test_bradley_terry_loss_by_hand() -> None:
    """−log σ(1 − 0) = 0.313262 and −log σ(0) = log 2 = 0.693147: their mean."""
    loss = bradley_terry_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5]))
    assert loss.item() == pytest.approx((0.313262 + 0.693147) / 2, abs=1e-6)


def test_rloo_advantage_is_each_reward_less_the_others_mean() -> None:
    """[1, 2, 3]: baselines (2+3)/2, (1+3)/2, (1+2)/2; k = 2: each the difference from the other."""
    assert rloo_advantages(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[-1.5, 0.0, 1.5]]
    assert rloo_advantages(torch.tensor([[0.25, 1.0], [2.0, 2.0]])).tolist() == [[-0.75, 0.75], [0.0, 0.0]]


def test_grpo_advantage_and_k3_by_hand() -> None:
    """[1, 2, 3]: mean 2, sd 1 → (−1, 0, 1) (less 10⁻⁴ of the sd's guard); k3 at log π = −1, log π_ref = −2:
    d = −1, e⁻¹ + 1 − 1 = 0.367879; 0 where the two agree."""
    assert grpo_advantages(torch.tensor([[1.0, 2.0, 3.0]])).flatten().tolist() == pytest.approx([-1, 0, 1], abs=1e-3)
    assert k3_kl(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0])).tolist() == pytest.approx(
        [0.367879, 0.0], abs=1e-6
    )


def test_ppo_clipped_objective_by_hand() -> None:
    """ε = 0.2. r = 1.5: A = +1 → max(−1.5, −1.2) = −1.2 (the gain is clipped); A = −1 → max(1.5, 1.2) = 1.5 (the
    loss is not). r = 0.5: A = +1 → max(−0.5, −0.8) = −0.5; A = −1 → max(0.5, 0.8) = 0.8. Their mean is 0.15, the
    last two's too; the first and the last's, (−1.2 + 0.8)/2 = −0.2."""
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5])
    advantage = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert ppo_policy_loss(ratio.log(), advantage, 0.2).item() == pytest.approx(0.15, abs=1e-6)
    last_two = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert ppo_policy_loss(ratio.log(), advantage, 0.2, last_two).item() == pytest.approx(0.15, abs=1e-6)
    first_and_last = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert ppo_policy_loss(ratio.log(), advantage, 0.2, first_and_last).item() == pytest.approx(-0.2, abs=1e-6)


def test_ppo_value_loss_by_hand() -> None:
    """V = 2, V_old = 1, R = 3, ε = 0.2: clipped V = 1.2; ½·max((2 − 3)², (1.2 − 3)²) = ½·3.24 = 1.62. V = 2.9 from
    V_old = 2.8: within the clip, ½·(2.9 − 3)² = 0.005."""
    values, old, returns = torch.tensor([[2.0, 2.9]]), torch.tensor([[1.0, 2.8]]), torch.tensor([[3.0, 3.0]])
    assert ppo_value_loss(values, old, returns, 0.2, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(1.62)
    assert ppo_value_loss(values, old, returns, 0.2, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(
        0.005, abs=1e-7
    )


def test_gae_by_hand() -> None:
    """γ = 1, λ = 0.5, V = (0.5, 0.6, 0.7), reward 1 at the last token: δ = (0.1, 0.1, 0.3); A_2 = 0.3,
    A_1 = 0.1 + 0.5·0.3 = 0.25, A_0 = 0.1 + 0.5·0.25 = 0.225. A completion that ends at token 1 (reward 1 there):
    V_2 and A_2 are 0, δ_1 = 1 − 0.6 = 0.4, A_0 = 0.1 + 0.5·0.4 = 0.3."""
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.flatten().tolist() == pytest.approx([0.225, 0.25, 0.3, 0.3, 0.4, 0.0])


def test_best_of_n_kl_against_an_exact_computation() -> None:
    """log n − (n − 1)/n against the KL computed exactly for a reference uniform over K outcomes with distinct scores
    (the best of n is the i-th best with probability (i/K)^n − ((i−1)/K)^n), which tends to it as K grows."""
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    k = 200_000
    i = torch.arange(1, k + 1, dtype=torch.float64)
    for n in (2, 4, 16, 64):
        p = (i / k) ** n - ((i - 1) / k) ** n
        exact = float(torch.xlogy(p, p * k).sum())  # 0·log 0 = 0 where (1/K)^n underflows
        assert best_of_n_kl(n) == pytest.approx(exact, abs=1e-3)


def test_spearman_by_hand_and_with_ties() -> None:
    """(1, 2, 3, 4) against (1, 3, 2, 4): 1 − 6·2/(4·15) = 0.8; with ties, pandas' rank correlation agrees."""
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)
    a, b = [0.3, 0.1, 0.1, 0.9, 0.5, 0.5], [1.0, 0.0, 0.5, 0.5, 0.2, 0.9]
    expected = pd.Series(a).rank().corr(pd.Series(b).rank())  # Pearson's r of pandas' average ranks
    assert spearman(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)) == pytest.approx(
        expected
    )


def test_methods_are_selected_by_name_beside_the_variants() -> None:
    registry = get_losses()
    losses, methods = resolve_names(("dpo", "rloo", "online_ipo", "best_of_n"), registry)
    assert losses == ["dpo"] and list(methods) == ["rloo", "online_ipo", "best_of_n"]
    assert methods["online_ipo"].loss is registry["ipo"] and "beta" in methods["online_ipo"].params
    online = methods["online_ipo"].build(beta=0.5, labeller="gold")
    assert online.loss is not None and online.loss.hparams["beta"] == 0.5 and online.hparams["labeller"] == "gold"
    with pytest.raises(UnknownLossError, match="did you mean 'rloo'"):
        resolve_names(("rlo",), registry)
    with pytest.raises(UnknownLossError, match="kto trains on unpaired examples"):
        method_spec("online_kto", registry)


def test_every_method_trains_two_steps_from_the_reference(two_steps: Path) -> None:
    """At step 1 the policy is the reference: the samples' KL is 0 and online DPO's loss is log 2. Best-of-1 keeps
    the reference's own evaluation samples (the same draws): the same gold reward, prompt by prompt; its KL and
    best-of-4's are the analytic values. The learned reward is recorded for the methods only."""
    tidy = read_tidy(two_steps / "results.sqlite")
    cells = tidy.drop_duplicates("cell_id").set_index("cell_id")
    assert set(cells.status) == {"done"} and len(cells) == 8  # the reference, 5 methods and DPO, best-of-1 and 4

    def value(variant: str, metric: str, step: int | None = None, params: str | None = None) -> float:
        rows = tidy[(tidy.variant == variant) & (tidy.metric == metric)]
        if params is not None:
            rows = rows[rows.params.map(json.loads).map(lambda p: p.get("n")) == int(params)]
        if step is not None:
            rows = rows[rows.step == step]
        assert len(rows) == 1, (variant, metric, len(rows))
        return float(rows.value.iloc[0])

    for method in ("rloo", "grpo", "ppo"):
        assert value(method, "rollout_kl", 1) == pytest.approx(0.0, abs=1e-4)
        assert value(method, "proxy_reward") == value(method, "proxy_reward")  # measured (not NaN)
    assert value("online_dpo", "loss", 1) == pytest.approx(math.log(2), abs=1e-5)
    assert value("ppo", "value_loss", 2) >= 0
    assert value("best_of_n", "gold_reward", params="1") == value("(reference)", "gold_reward")
    assert value("best_of_n", "kl_to_reference", params="1") == 0.0
    assert value("best_of_n", "kl_to_reference", params="4") == pytest.approx(math.log(4) - 0.75)
    assert value("best_of_n", "n_samples", params="4") == 4 * DATA.eval_prompts
    assert not ((tidy.variant == "dpo") & (tidy.metric == "proxy_reward")).any()
    with sqlite3.connect(two_steps / "results.sqlite") as db:
        info = json.loads(db.execute("SELECT info FROM runs").fetchone()[0])
    assert info["reward_models"]["clean"]["heldout_accuracy"] > 0.55


def test_the_reward_models_accuracy_read_independently(two_steps: Path) -> None:
    """The stored held-out accuracy, recomputed from the saved folder through transformers' own classifier forward
    (its pooling at the last non-pad token), not dpobench's scoring."""
    from transformers import AutoModelForSequenceClassification

    from dpobench.data import cached_task_data
    from dpobench.models import cache_root, load_model, model_fingerprint, reference_model

    with sqlite3.connect(two_steps / "results.sqlite") as db:
        info = json.loads(db.execute("SELECT info FROM runs").fetchone()[0])["reward_models"]["clean"]
    folder = reference_model(SFT)
    model, tokenizer = load_model(folder)
    data = cached_task_data(model, tokenizer, DATA, model_fingerprint=model_fingerprint(folder), cache_dir=cache_root(),
                            device="cpu")  # fmt: skip
    classifier = AutoModelForSequenceClassification.from_pretrained(info["folder"]).eval()
    classifier.config.pad_token_id = tokenizer.pad_token_id
    wins = 0
    with torch.no_grad():
        for pair in data.heldout.pairs:
            rows = [list(pair.prompt + pair.chosen), list(pair.prompt + pair.rejected)]
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            scores = classifier(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits[:, 0]
            wins += int(scores[0] > scores[1])
    assert wins / len(data.heldout.pairs) == pytest.approx(info["heldout_accuracy"], abs=1e-6)  # one pair is 1/62


def test_a_reward_model_that_did_not_learn_marks_its_cells(tmp_path: Path, monkeypatch) -> None:
    """Held to a bar it cannot pass (held-out accuracy above 0.999), the reward model is reported in one line and
    the methods trained against it are marked failed, untrained; online DPO labelled by the gold reward trains."""
    import dpobench.methods
    import dpobench.reward_model

    monkeypatch.setattr(dpobench.reward_model, "LEARNED_ABOVE", 0.999)
    monkeypatch.setattr(dpobench.methods, "LEARNED_ABOVE", 0.999)
    messages: list[str] = []
    run_sweep(config(variants=("rloo", "online_dpo"), params={"online_dpo": {"labeller": ("gold",)}}), tmp_path,
              progress=messages.append)  # fmt: skip
    assert any("did not learn the preferences" in m for m in messages)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        cells = {
            variant: (status, error)
            for variant, status, error in db.execute("SELECT variant, status, error FROM cells")
        }
        steps = dict(db.execute("SELECT variant, COUNT(*) FROM cells JOIN measurements USING (cell_id) "
                                "WHERE source = 'step' GROUP BY variant"))  # fmt: skip
    assert cells["rloo"][0] == "failed" and "held-out accuracy" in cells["rloo"][1] and "rloo" not in steps
    assert cells["online_dpo"][0] == "done" and steps["online_dpo"] > 0
    with sqlite3.connect(tmp_path / "results.sqlite") as db:  # gold labels are not the learned reward: not recorded
        recorded = {m for (m,) in db.execute("SELECT DISTINCT metric FROM cells JOIN measurements USING (cell_id) "
                                             "WHERE variant = 'online_dpo' AND source = 'step'")}  # fmt: skip
    assert "rollout_kl" in recorded and "rollout_reward" not in recorded


def test_an_interrupted_method_cell_resumes(tmp_path: Path) -> None:
    """Ctrl-C after RLOO's first step: nothing of the cell is kept; the rerun trains it whole."""

    class StopAfterOneStep(Progress):
        stop = False

        def advance(self, step: int) -> None:
            self.stop = True

    progress = StopAfterOneStep()
    settings = config(variants=("rloo",), executor=ExecutorOptions(parallel_cells=1))
    with pytest.raises(SweepInterrupted, match="interrupted in cell rloo"):
        run_sweep(
            settings, tmp_path, progress=lambda m: None, cell_progress=progress, should_stop=lambda: progress.stop
        )
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert [v for (v,) in db.execute("SELECT variant FROM cells")] == ["(reference)"]
    run_sweep(settings, tmp_path, progress=lambda m: None)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert dict(db.execute("SELECT variant, status FROM cells")) == {"(reference)": "done", "rloo": "done"}


def test_a_diverging_rl_cell_stops_with_its_reason(tmp_path: Path) -> None:
    """At a learning rate of 30 RLOO's policy leaves the reference within a few steps: the cell stops there as
    diverged, saying at which step and why (its samples' KL past the bound, or values that are not finite), and the
    steps before it are kept."""
    settings = config(variants=("rloo",))
    settings = SweepConfig(**{**settings.__dict__, "train": TrainConfig(steps=12, batch_size=8, lr=30.0)})
    run_sweep(settings, tmp_path, progress=lambda m: None)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        status, error = db.execute("SELECT status, error FROM cells WHERE variant = 'rloo'").fetchone()
        steps = db.execute("SELECT MAX(step) FROM measurements WHERE source = 'step'").fetchone()[0]
    assert status == "diverged", error
    stopped = int(error.split(":")[0].removeprefix("step "))
    assert stopped == steps + 1 and any(why in error for why in ("past the bound of 100", "not finite", "the loss is"))


def test_the_report_compares_dpo_with_rlhf(two_steps: Path) -> None:
    """The report's DPO-vs-RLHF table, from the 2-step store: each configuration's kind, the completions it sampled
    (2 steps × 2 × 8 prompts for the trained methods; n × 64 evaluation prompts for best-of-N; none offline), the
    models it held, and the DPO paper's finding checked in the text."""
    from dpobench.report import build_report

    sections = {s.id: s for s in build_report(two_steps).sections}
    table = sections["rlhf"].tables[0][1].set_index("variant")
    assert table.kind.to_dict() == {
        "dpo": "offline loss", "online_dpo": "online preference", "rloo": "on-policy RL", "grpo": "on-policy RL",
        "ppo": "on-policy RL", "best_of_n[n=4]": "best-of-N sampling", "best_of_n[n=1]": "best-of-N sampling",
    }  # fmt: skip
    assert table.samples_drawn.to_dict() == {"dpo": 0, "online_dpo": 32, "rloo": 32, "grpo": 32, "ppo": 32,
                                             "best_of_n[n=4]": 256, "best_of_n[n=1]": 64}  # fmt: skip
    assert table.models["ppo"] == "policy, reference, reward model, critic"
    assert table.models["online_dpo"] == "policy, reference, reward model"
    assert table.models["best_of_n[n=4]"] == "reference, reward model" and table.models["dpo"] == "policy, reference"
    assert table.proxy_reward.isna()["dpo"] and table.proxy_reward.notna().drop("dpo").all()
    assert "at β = 0.1, dpo " in sections["rlhf"].text and "over 1 seed:" in sections["rlhf"].text


def test_methods_train_lora_adapters(tmp_path: Path) -> None:
    """With --lora the methods train the adapters alone (peft's B starts at zero, so at step 1 the policy is the base
    model: the samples' KL is 0), and the reference stays the base model; PPO's critic trains every weight."""
    pytest.importorskip("peft")
    from dpobench.config import LoraOptions

    run_sweep(config(variants=("rloo", "ppo", "online_dpo"), lora=LoraOptions(enabled=True, rank=4)), tmp_path,
              progress=lambda m: None)  # fmt: skip
    tidy = read_tidy(tmp_path / "results.sqlite")
    cells = tidy.drop_duplicates("cell_id").set_index("variant")
    assert set(cells.status) == {"done"} and json.loads(cells.config["rloo"])["lora"].startswith("rank=4")
    first = tidy[(tidy.metric == "rollout_kl") & (tidy.step == 1)].set_index("variant").value
    assert first["rloo"] == pytest.approx(0.0, abs=1e-4) and first["ppo"] == pytest.approx(0.0, abs=1e-4)
    second = tidy[(tidy.metric == "rollout_kl") & (tidy.step == 2)].set_index("variant").value
    assert second["rloo"] != 0.0  # the adapters moved


def test_the_rlhf_preset_plans_its_75_cells(tmp_path: Path) -> None:
    """--preset rlhf: 3 offline losses × 3 β × 3 seeds (27), online DPO × 2 labellers × 3 β × 3 seeds (18), RLOO and
    PPO × 3 β × 3 seeds (18), best-of-N × 4 sample counts × 3 seeds (12, no β). Variants named instead, on the command
    line or in a file, take the preset's grids of the others with them (a grid of a variant not in the sweep is an
    error)."""
    from dpobench.config import load_config
    from dpobench.sweep import plan_sweep

    cells = plan_sweep(load_config({"preset": "rlhf"})).cells
    assert len(cells) == 75 and Counter(c.spec.name for c in cells) == {
        "dpo": 9, "ipo": 9, "simpo": 9, "online_dpo": 18, "rloo": 9, "ppo": 9, "best_of_n": 12}  # fmt: skip
    assert sorted({c.hparams["n"] for c in cells if c.spec.name == "best_of_n"}) == [1, 4, 16, 64]
    assert load_config({"preset": "rlhf", "variants": "dpo,best_of_n"}).params == {"best_of_n": {"n": (1, 4, 16, 64)}}
    file = tmp_path / "sweep.toml"
    file.write_text('preset = "rlhf"\nvariants = ["dpo", "rloo"]\n')
    assert len(plan_sweep(load_config({}, file=file)).cells) == 18
