"""Does a ranking transfer: rank correlations by hand, and two hand-made stores compared (`dpobench compare`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpobench.cli import CLIError, app
from dpobench.store import Store
from dpobench.transfer import kendall_tau_b, rank_transfer, spearman_rho


def store(
    folder: Path,
    golds: dict[str, list[float]],
    beta: float = 0.1,
    grammar: dict[str, float] | None = None,
    repetitive: dict[str, float] | None = None,
    model: str = "tiny",
) -> Path:
    """One run of ``model`` (added to the store in ``folder`` if there is one): each configuration one cell whose
    evaluation kept these per-prompt gold rewards; and the reference."""
    path = folder / "results.sqlite"
    grammar, repetitive = grammar or {}, repetitive or {}
    results = Store(path)
    run = f"run-{model}"
    results.add_run(run, config={}, model=model, model_hash=model, device="cpu", dtype="float32")
    base = {"run_id": run, "plugin": "p", "plugin_version": "1", "seed": 0, "scenario": "clean", "model": model,
            "model_hash": model, "device": "cpu", "dtype": "float32", "config": "{}", "status": "done", "error": "",
            "started": 0.0, "finished": 1.0, "seconds": 1.0}  # fmt: skip
    for variant, values in golds.items():
        cell = {**base, "cell_id": f"{variant}-{model}", "variant": variant, "params": json.dumps({"beta": beta}),
                "beta": beta}  # fmt: skip
        results.write_cell(cell, [], [{"step": 10, "gold_reward": float(np.mean(values)), "gold_samples": values,
                                       "kl_to_reference": 1.0, "grammatical_fraction": grammar.get(variant, 0.9),
                                       "repetitive_fraction": repetitive.get(variant, 0.0)}])  # fmt: skip
    results.write_cell({**base, "cell_id": f"ref-{model}", "variant": "(reference)", "role": "reference", "params": "{}",
                        "beta": math.nan}, [], [{"step": 0, "gold_reward": 0.0, "gold_samples": [0.0] * 5}])  # fmt: skip
    results.close()
    return folder


def test_rank_correlations_by_hand() -> None:
    """x = 1 2 3 4 against y = 1 3 2 4: one discordant pair of six, τ = (5 − 1)/6; ranks differ by 1 twice,
    ρ = 1 − 6·2/(4·15) = 0.8. With a tie in x (1 1 2 against 1 2 3): τ-b = 2/√(2·3), the tied pair left out of x's
    count (scipy's kendalltau gives the same)."""
    assert kendall_tau_b(np.array([1, 2, 3, 4.0]), np.array([1, 3, 2, 4.0])) == pytest.approx(4 / 6)
    assert spearman_rho(np.array([1, 2, 3, 4.0]), np.array([1, 3, 2, 4.0])) == pytest.approx(0.8)
    assert kendall_tau_b(np.array([1, 1, 2.0]), np.array([1, 2, 3.0])) == pytest.approx(2 / math.sqrt(6))


def test_two_runs_that_swap_the_first_and_last_configuration(tmp_path: Path) -> None:
    """A ranks a b c d, B ranks d b c a: five of the six pairs are discordant, τ = (1 − 5)/6 = −2/3; ρ = 1 − 6·18/60
    = −0.8. Every prompt scores a configuration alike, so every bootstrap draw gives the same τ and ρ: the intervals
    are points. a and d moved three places, b and c none; d's samples in B are degenerate, and the table says so."""
    a = store(tmp_path / "a", {"a": [0.4] * 5, "b": [0.3] * 5, "c": [0.2] * 5, "d": [0.1] * 5})
    b = store(tmp_path / "b", {"a": [0.1] * 5, "b": [0.3] * 5, "c": [0.2] * 5, "d": [0.4] * 5}, grammar={"d": 0.3},
              repetitive={"c": 0.6})  # fmt: skip
    result = rank_transfer(a, b, draws=200)
    assert result.tau == pytest.approx(-2 / 3) and result.rho == pytest.approx(-0.8)
    assert result.tau_interval == pytest.approx((-2 / 3, -2 / 3)) and result.rho_interval == pytest.approx((-0.8, -0.8))
    table = result.table.set_index("configuration")
    assert table.rank_a.to_dict() == {"a β=0.1": 1, "b β=0.1": 2, "c β=0.1": 3, "d β=0.1": 4}
    assert table.moved.to_dict() == {"a β=0.1": 3, "b β=0.1": 0, "c β=0.1": 0, "d β=0.1": -3}
    # d tops B with 30% grammatical samples, c loops in 60% of its samples there: ranked by gold all the same, and
    # named as degenerate there
    assert table.degenerate_in.to_dict() == {"a β=0.1": "", "b β=0.1": "", "c β=0.1": "B", "d β=0.1": "B"}
    output = " ".join(CliRunner().invoke(app, ["compare", str(a), str(b), "--bootstrap", "200"]).stdout.split())
    assert "4 configurations in both. Kendall τ-b = -0.67 (95% interval -0.67 to -0.67); Spearman ρ = -0.80" in output
    assert "Moved most: a β=0.1 (1 → 4), d β=0.1 (4 → 1)" in output


def test_noisy_prompts_give_an_interval_around_the_estimate(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    means = {f"v{i}": 0.05 * i for i in range(6)}
    a = store(tmp_path / "a", {k: list(m + rng.normal(0, 0.3, 40)) for k, m in means.items()})
    b = store(tmp_path / "b", {k: list(m + rng.normal(0, 0.3, 40)) for k, m in means.items()})
    result = rank_transfer(a, b, draws=300)
    low, high = result.tau_interval
    assert -1 <= low < high <= 1 and low <= result.tau <= high


def test_runs_that_share_too_few_configurations_are_refused(tmp_path: Path) -> None:
    a = store(tmp_path / "a", {"a": [0.4], "b": [0.3], "c": [0.1]})
    b = store(tmp_path / "b", {"a": [0.4], "b": [0.3], "z": [0.1]})
    with pytest.raises(ValueError, match=r"share 2 configuration\(s\) in 'clean'; a rank correlation needs 3 or more"):
        rank_transfer(a, b)
    with pytest.raises(CLIError, match=r"nowhere: no results.sqlite here; give the --out directory"):
        CliRunner().invoke(app, ["compare", str(a), str(tmp_path / "nowhere")], catch_exceptions=False)
    with pytest.raises(CLIError, match=r"share 2 configuration\(s\)"):  # the module's error, as one line
        CliRunner().invoke(app, ["compare", str(a), str(b)], catch_exceptions=False)


def test_one_store_holding_two_models_reports_whether_the_ranking_transfers(tmp_path: Path) -> None:
    """Runs of two models into one --out: the report compares their rankings as `dpobench compare` compares two
    stores holding the same cells (the same τ, ρ, intervals and table), in a section of its own."""
    from dpobench.report import build_report

    golds_a = {"a": [0.4, 0.5, 0.3, 0.6], "b": [0.3, 0.2, 0.35, 0.3], "c": [0.1, 0.3, 0.2, 0.2], "d": [0.0] * 4}
    golds_b = {"a": [0.1, 0.2, 0.0, 0.1], "b": [0.3, 0.4, 0.2, 0.3], "c": [0.2, 0.2, 0.3, 0.1], "d": [0.5] * 4}
    store(tmp_path / "both", golds_a, model="tiny")
    store(tmp_path / "both", golds_b, model="small", repetitive={"d": 0.5})
    apart = rank_transfer(store(tmp_path / "a", golds_a, model="tiny"),
                          store(tmp_path / "b", golds_b, model="small", repetitive={"d": 0.5}), draws=1000)  # fmt: skip
    sections = [s for s in build_report(tmp_path / "both").sections if s.id.startswith("transfer")]
    assert len(sections) == 1 and sections[0].title == "Does the ranking transfer? small"
    assert sections[0].text == ("This store holds cells of more than one model: A is tiny, B is small; each "
                                "configuration both trained in clean, ranked by its gold reward in each. "
                                + apart.summary())  # fmt: skip
    shown = sections[0].tables[0][1]
    assert list(shown["rank A"]) == list(apart.table.rank_a) and list(shown["degenerate in"]) == ["", "", "", "B"]
    # a b c d against d b c a: only (b, c) of the six pairs agrees, τ = (1 − 5)/6
    assert apart.tau == pytest.approx(-2 / 3) and "Moved most: a β=0.1 (1 → 4), d β=0.1 (4 → 1)." in apart.summary()
    # one model: no such section
    assert not [s for s in build_report(tmp_path / "a").sections if s.id.startswith("transfer")]
