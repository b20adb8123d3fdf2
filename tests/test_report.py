"""Reports from a small hand-made store: tables against hand computations, figures show what went in,
every string escaped, the PDF and the HTML well formed."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpobench import Study, figures
from dpobench.report import _SORT_SCRIPT, batch_layout, build_report, plugin_sources, render_html, write_report
from dpobench.store import Store
from dpobench.tables import CELL_COLUMNS, aggregate, cell_finals, rank, read_tidy, summary_table, variant_table

EVIL = "<script>alert(1)</script>"
# (variant, beta, seed) -> final gold reward; losses are 1 − step/100 + seed/100 at every step
GOLD = {("dpo", 0.1, 0): 0.30, ("dpo", 0.1, 1): 0.40, ("dpo", 0.5, 0): 0.20, ("dpo", 0.5, 1): 0.22,
        (EVIL, 0.1, 0): 0.10, (EVIL, 0.1, 1): 0.50, (EVIL, 0.5, 0): -0.10, (EVIL, 0.5, 1): -0.12}  # fmt: skip


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store")
    store = Store(out / "results.sqlite")
    store.add_run("run-1", command="dpobench run", config={"note": EVIL}, dpobench_version="0.1.0",
                  torch_version="2.13.0", transformers_version="5.24.0", model="tiny", model_hash="abc",
                  device="cpu", dtype="float32")  # fmt: skip
    for (variant, beta, seed), gold in GOLD.items():
        cell = {"cell_id": f"{variant}-{beta}-{seed}", "run_id": "run-1", "variant": variant, "plugin": "p",
                "plugin_version": "1", "params": json.dumps({"beta": beta}), "beta": beta, "seed": seed,
                "scenario": "clean", "model": "tiny", "model_hash": "abc", "device": "cpu", "dtype": "float32",
                "config": "{}", "status": "done", "error": "", "started": 0.0, "finished": 1.0, "seconds": 1.0}  # fmt: skip
        steps = [{"step": s, "loss": 1 - s / 100 + seed / 100, "reward_accuracy": 0.5, "reward_margin": s / 10,
                  "chosen_reward": 0.0, "rejected_reward": 0.0, "pairs_per_s": 100.0 + seed, "tokens_per_s": 1000.0,
                  "peak_memory_mb": 50.0} for s in range(1, 21)]  # fmt: skip
        evals = [{"step": 20, "gold_reward": gold, "gold_reward_se": 0.01, "kl_to_reference": beta * 10 + seed,
                  "response_length": 15.0, "grammatical_fraction": 0.9}]  # fmt: skip
        store.write_cell(cell, steps, evals)
    write_reference(store, "tiny", {"gold_reward": 0.0, "gold_reward_se": 0.02, "kl_to_reference": 0.0})
    store.close()
    return out


def write_reference(store: Store, model: str, evaluation: dict[str, float]) -> None:
    """The reference's cell: no steps, one evaluation at step 0."""
    store.write_cell(
        {"cell_id": "ref-0", "run_id": "run-1", "variant": "(reference)", "role": "reference", "plugin": "",
         "plugin_version": "",
         "params": "{}", "beta": math.nan, "seed": 0, "scenario": "clean", "model": model, "model_hash": "abc",
         "device": "cpu", "dtype": "float32", "config": "{}", "status": "done", "error": "", "started": 0.0,
         "finished": 0.0, "seconds": 0.0},
        [], [{"step": 0, **evaluation}],
    )  # fmt: skip


@pytest.fixture(scope="module")
def data_store_dir(tmp_path_factory) -> Path:
    """A store of cells trained on pairs from --data: no gold reward, no grammar; held-out implicit-reward
    accuracy 0.6 (dpo) and 0.8 (ipo), steps of 10 ms (dpo) and 5 ms (ipo)."""
    out = tmp_path_factory.mktemp("data_store")
    store = Store(out / "results.sqlite")
    config = {"data": "pairs.jsonl", "data_recipe": {"labels": "hard"}, "noise": 0.2, "variants": ["dpo", "ipo"]}
    store.add_run("run-1", command="dpobench run --data pairs.jsonl", config=config, dpobench_version="0.1.0",
                  torch_version="2.13.0", transformers_version="5.24.0", model="m", model_hash="abc",
                  device="cpu", dtype="float32")  # fmt: skip
    for variant, accuracy, ms in (("dpo", 0.6, 10.0), ("ipo", 0.8, 5.0)):
        cell = {"cell_id": variant, "run_id": "run-1", "variant": variant, "plugin": "p", "plugin_version": "1",
                "params": "{}", "beta": 0.1, "seed": 0, "scenario": "clean", "model": "m", "model_hash": "abc",
                "device": "cpu", "dtype": "float32", "config": "{}", "status": "done", "error": "", "started": 0.0,
                "finished": 1.0, "seconds": 1.0}  # fmt: skip
        steps = [{"step": s, "loss": 0.5, "reward_accuracy": 0.5, "reward_margin": 0.1, "step_time_ms": ms,
                  "chosen_reward": 0.0, "rejected_reward": 0.0,
                  "pairs_per_s": 32 / (ms / 1e3), "tokens_per_s": 1000.0, "peak_memory_mb": 50.0}
                 for s in range(1, 11)]  # fmt: skip
        evals = [{"step": 10, "kl_to_reference": 0.5, "response_length": 12.0, "heldout_reward_accuracy": accuracy}]
        store.write_cell(cell, steps, evals)
    write_reference(store, "m", {"kl_to_reference": 0.0, "response_length": 11.0})
    store.close()
    return out


def test_a_report_of_data_pairs_ranks_by_held_out_accuracy_and_omits_gold(data_store_dir: Path) -> None:
    """Pairs from --data have no gold reward: the report ranked by an all-NaN gold reward (every rank <NA>), said
    "the SFT reference scores a gold reward of +nan" and drew an empty gold-vs-KL figure."""
    report = build_report(data_store_dir)
    assert dict(report.header)["ranked by"] == "heldout_reward_accuracy"
    shown = json.loads(dict(report.header)["configuration"])  # without the synthetic task's unused settings
    assert shown == {"data": "pairs.jsonl", "variants": ["dpo", "ipo"]}
    sections = {s.id: s for s in report.sections}
    assert "frontier" not in sections
    summary = sections["summary"].tables[0][1]
    assert not {"gold_reward", "gold_reward_ci", "grammatical_fraction"} & set(summary)
    assert summary.variant.tolist() == ["ipo", "dpo"] and summary["rank"].tolist() == [1, 2]
    assert "+nan" not in sections["summary"].text and "no gold reward" in sections["summary"].text
    with pytest.raises(ValueError, match="--metric gold_reward: these cells trained on pairs from --data"):
        build_report(data_store_dir, metric="gold_reward")
    terminal = variant_table(cell_finals(read_tidy(data_store_dir)))
    assert "gold ± 95% CI" not in terminal and "gram" not in terminal
    assert terminal.variant.tolist() == ["(reference)", "ipo", "dpo"]
    assert terminal["held-out acc"].tolist() == ["–", "0.80", "0.60"]


@pytest.mark.parametrize("metric", ["step_time_ms", "tokens_per_s", "peak_memory_mb"])
def test_every_metric_the_cli_offers_can_rank(data_store_dir: Path, metric: str) -> None:
    """Three metrics of HIGHER_IS_BETTER (the --metric list) were not among the summary's columns: a KeyError."""
    summary = {s.id: s for s in build_report(data_store_dir, metric=metric).sections}["summary"].tables[0][1]
    assert metric in summary
    if metric == "step_time_ms":  # lower is better: ipo's 5 ms steps first
        assert summary.variant.tolist() == ["ipo", "dpo"] and summary.step_time_ms.tolist() == [5.0, 10.0]


def test_tidy_frame_is_long_with_provenance(store_dir: Path) -> None:
    tidy = read_tidy(store_dir)
    assert {"variant", "plugin", "beta", "seed", "scenario", "torch_version", "metric", "value", "source"} <= set(tidy)
    one = tidy[(tidy.cell_id == "dpo-0.1-1") & (tidy.metric == "loss")]
    assert len(one) == 20 and one.value.tolist()[-1] == pytest.approx(1 - 0.20 + 0.01)


def test_finals_average_the_last_tenth_of_steps(store_dir: Path) -> None:
    finals = cell_finals(read_tidy(store_dir)).set_index("cell_id")
    # 20 steps: the last 10% are steps 19 and 20 → loss = 1 − 19.5/100 + seed/100
    assert finals.loc["dpo-0.1-1", "loss"] == pytest.approx(1 - 0.195 + 0.01)
    assert finals.loc["dpo-0.1-1", "reward_margin"] == pytest.approx(1.95)
    assert finals.loc["dpo-0.5-0", "gold_reward"] == pytest.approx(0.20)
    assert finals.loc["ref-0", "gold_reward"] == 0.0


def test_throughput_is_the_windows_work_over_its_time(tmp_path: Path) -> None:
    """Pairs/s over the last tenth of steps is Σ pairs / Σ seconds, so it agrees with the mean step time: steps of
    10 ms and 1 ms at 32 pairs make 64 pairs in 11 ms, 5818 pairs/s, not the 17600 that averaging the rates gives."""
    store = Store(tmp_path / "results.sqlite")
    store.add_run("run-1", command="dpobench run", config={}, dpobench_version="0.1.0", torch_version="2.13.0",
                  transformers_version="5.24.0", model="tiny", model_hash="abc", device="cpu", dtype="float32")  # fmt: skip
    cell = {"cell_id": "c", "run_id": "run-1", "variant": "dpo", "plugin": "p", "plugin_version": "1",
            "params": "{}", "beta": 0.1, "seed": 0, "scenario": "clean", "model": "tiny", "model_hash": "abc",
            "device": "cpu", "dtype": "float32", "config": "{}", "status": "done", "error": "", "started": 0.0,
            "finished": 1.0, "seconds": 1.0}  # fmt: skip
    ms = [5.0] * 18 + [10.0, 1.0]  # 20 steps: the window is steps 19 and 20
    steps = [{"step": s + 1, "loss": 0.5, "step_time_ms": t, "pairs_per_s": 32 / (t / 1e3),
              "tokens_per_s": 3200 / (t / 1e3)} for s, t in enumerate(ms)]  # fmt: skip
    store.write_cell(cell, steps, [])
    store.close()
    final = cell_finals(read_tidy(tmp_path)).set_index("cell_id").loc["c"]
    assert final.step_time_ms == pytest.approx(5.5)
    assert final.pairs_per_s == pytest.approx(64 / 0.011) and final.tokens_per_s == pytest.approx(6400 / 0.011)
    assert final.pairs_per_s == pytest.approx(32 / (final.step_time_ms / 1e3))


def test_confidence_interval_is_a_t_interval_over_seeds(store_dir: Path) -> None:
    table = aggregate(cell_finals(read_tidy(store_dir)), ["gold_reward", "kl_to_reference"]).set_index(
        ["variant", "beta"]
    )
    row = table.loc[("dpo", 0.1)]
    # Two seeds: 0.30, 0.40 → mean 0.35, s = 0.0707…, half-width t(0.975, 1) · s/√2 = 12.706 · 0.05
    assert row.gold_reward == pytest.approx(0.35)
    assert row.gold_reward_ci == pytest.approx(12.706 * 0.05)
    assert row.kl_to_reference == pytest.approx(1.5) and row.seeds == 2
    one_seed = aggregate(cell_finals(read_tidy(store_dir)).query("seed == 0"), ["gold_reward", "loss"])
    assert one_seed.gold_reward_ci.iloc[0] == pytest.approx(1.96 * 0.01)  # the sampling interval
    assert math.isnan(one_seed.loss_ci.iloc[0])  # no interval from one number


def test_ranking_calls_a_tie_a_tie() -> None:
    table = pd.DataFrame(
        {"gold_reward": [0.50, 0.45, 0.20, 0.19, 0.05], "gold_reward_ci": [0.03, 0.03, 0.01, 0.01, 0.0]}
    )
    # 0.45 overlaps 0.50 (|Δ| 0.05 ≤ 0.06); 0.20 does not; 0.19 overlaps 0.20; 0.05 alone.
    assert rank(table, "gold_reward").tolist() == [1, 1, 3, 3, 5]
    # Lower is better for KL: the order flips.
    kl = pd.DataFrame({"kl_to_reference": [3.0, 1.0, 2.0], "kl_to_reference_ci": [0.1, 0.1, 0.1]})
    assert rank(kl, "kl_to_reference").tolist() == [3, 1, 2]


def test_summary_ranks_by_the_chosen_metric(store_dir: Path) -> None:
    summary = summary_table(cell_finals(read_tidy(store_dir)), "gold_reward")
    assert summary.iloc[0].variant in {"dpo", EVIL}
    # With two seeds the intervals are wide (t = 12.7): every cell overlaps the leader.
    assert set(summary["rank"]) == {1}
    narrow = summary_table(cell_finals(read_tidy(store_dir)).query("seed == 0"), "gold_reward")
    assert narrow.columns[0] == "rank"  # first: what the table is for (it came last, after 20 columns)
    assert narrow[["variant", "beta", "rank"]].values.tolist() == [
        ["dpo", 0.1, 1],
        ["dpo", 0.5, 2],
        [EVIL, 0.1, 3],
        [EVIL, 0.5, 4],
    ]


def test_beta_figure_draws_the_values_that_went_in(store_dir: Path) -> None:
    summary = summary_table(cell_finals(read_tidy(store_dir)))
    fig = figures.beta_sensitivity(summary, figures.variant_colors(summary.variant), "clean")
    gold_axis = fig.axes[2]
    assert gold_axis.get_xscale() == "log" and "gold reward" in gold_axis.get_ylabel()
    # errorbar() labels its container; the container's first line is the data line
    lines = {c.get_label(): c.lines[0] for c in gold_axis.containers}
    np.testing.assert_allclose(np.asarray(lines["dpo"].get_xdata(), dtype=float), [0.1, 0.5])
    np.testing.assert_allclose(np.asarray(lines["dpo"].get_ydata(), dtype=float), [0.35, 0.21])
    np.testing.assert_allclose(np.asarray(lines[EVIL].get_ydata(), dtype=float), [0.30, -0.11])
    assert fig._suptitle.get_text().startswith("β sensitivity")


def frontier_summary() -> pd.DataFrame:
    """A clean scenario by hand: a and b are the Pareto set (a the most reward, b the least drift keeping 90% of a's
    gain: 0.28 ≥ 0.27), c is beaten by both, d has the highest gold reward from degenerate samples, mine is the reader's
    own plugin (beaten), and a also ran at β = 0.5 (beaten by b)."""
    rows = [("a", 0.1, 1, 0.30, 1.0, 0.90), ("b", 0.1, 1, 0.28, 0.3, 0.95), ("c", 0.1, 3, 0.20, 2.0, 0.90),
            ("d", 0.1, 1, 0.40, 5.0, 0.50), ("mine", 0.1, 5, 0.10, 3.0, 0.90), ("a", 0.5, 4, 0.25, 0.8, 0.90)]  # fmt: skip
    frame = pd.DataFrame(
        rows, columns=["variant", "beta", "rank", "gold_reward", "kl_to_reference", "grammatical_fraction"]
    )
    return frame.assign(configuration=frame.variant, scenario="clean", seeds=1, gold_reward_ci=0.05)


def test_frontier_names_the_pareto_set_and_your_plugins_and_greys_the_rest() -> None:
    from matplotlib.colors import to_rgba

    from dpobench.verdict import verdict

    summary = frontier_summary()
    decided = verdict(summary, 0.0)
    assert decided.pareto == ("a β=0.1", "b β=0.1") and decided.least_drift == "b β=0.1"
    colors = figures.variant_colors(summary.variant)
    fig = figures.frontier(summary, colors, 0.0, decided=decided, own={"mine"})
    ax = fig.axes[0]
    named = {t.get_text(): t.get_fontweight() for t in ax.texts}
    assert list(named) == ["a β=0.1 (most reward)", "b β=0.1 (least drift)", "mine β=0.1"]  # best gold first
    assert named["a β=0.1 (most reward)"] == "bold" and named["mine β=0.1"] == "normal"
    points = {(float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0])): c.lines[0] for c in ax.containers}
    assert set(points) == {(1.0, 0.30), (0.3, 0.28), (2.0, 0.20), (5.0, 0.40), (3.0, 0.10), (0.8, 0.25)}
    assert (
        to_rgba(points[(1.0, 0.30)].get_color()) == colors["a"]
        and to_rgba(points[(3.0, 0.10)].get_color()) == colors["mine"]
    )
    assert points[(2.0, 0.20)].get_color() == "0.7" and points[(0.8, 0.25)].get_color() == "0.7"  # beaten: grey
    assert points[(5.0, 0.40)].get_marker() == "x"  # degenerate: a grey cross, whatever its reward
    # a's two β values joined by a line in a's colour, in KL order; the title says what the line is
    (line,) = [line for line in ax.get_lines() if len(line.get_xdata()) > 1 and line.get_linestyle() == "-"]
    assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == [(0.8, 0.25), (1.0, 0.30)]
    assert "a line joins one variant's β values" in ax.get_title()
    titles = figures.hover_titles(fig)
    assert titles[points[(5.0, 0.40)].get_gid()] == "d β=0.1: gold +0.400 ± 0.050, KL 5.00, 50% grammatical"
    assert (
        titles[points[(1.0, 0.30)].get_gid()] == "a β=0.1: gold +0.300 ± 0.050, KL 1.00, 90% grammatical (most reward)"
    )
    # one β per variant: no line, and the title does not mention one
    single = figures.frontier(summary[summary.beta == 0.1], colors, 0.0, decided=decided)
    assert "line" not in single.axes[0].get_title()
    assert not [
        line for line in single.axes[0].get_lines() if len(line.get_xdata()) > 1 and line.get_linestyle() == "-"
    ]


def test_hover_titles_are_escaped_into_the_svg() -> None:
    """A plugin's variant name is the reader's string: it reaches the page only inside an escaped SVG <title>."""
    from dpobench.report import _svg

    summary = frontier_summary().replace({"variant": {"mine": EVIL}, "configuration": {"mine": EVIL}})
    fig = figures.frontier(summary, figures.variant_colors(summary.variant), 0.0, own={EVIL})
    svg = _svg(fig)
    assert EVIL not in svg and "<title>&lt;script&gt;alert(1)&lt;/script&gt; β=0.1: gold +0.100 ± 0.050" in svg
    assert svg.count("<title>") == 6  # one per point


def test_html_escapes_every_string_and_is_self_contained(store_dir: Path) -> None:
    html = render_html(build_report(store_dir))
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # in tables and in the configuration header
    assert html.lower().count("<script") == 1 and f"<script>{_SORT_SCRIPT}</script>" in html  # only the table sorter
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from the network
    assert html.count("<svg") >= 4 and 'id="summary"' in html and 'href="#frontier"' in html


def test_write_report_writes_html_and_a_pdf(store_dir: Path, tmp_path: Path) -> None:
    written = write_report(store_dir, tmp_path)
    assert [p.name for p in written] == ["report.html", "report.pdf"]
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 5
    assert not list(tmp_path.glob(".*.tmp"))
    if shutil.which("pdftoppm"):
        subprocess.run(
            ["pdftoppm", "-r", "30", "-png", str(tmp_path / "report.pdf"), str(tmp_path / "page")], check=True
        )
        assert len(list(tmp_path.glob("page*.png"))) >= 5


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="Chromium not installed")
def test_html_renders_in_headless_chromium(store_dir: Path, tmp_path: Path) -> None:
    write_report(store_dir, tmp_path, formats=("html",))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,3000", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and (tmp_path / "shot.png").stat().st_size > 10_000
    assert "Uncaught" not in result.stderr and "CONSOLE" not in result.stderr


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="Chromium not installed")
def test_a_table_sorts_by_the_column_clicked_in_a_real_browser(store_dir: Path, tmp_path: Path) -> None:
    """The decision table's KL heading clicked twice (descending) and the gold heading once (ascending), in headless
    Chromium: the rows come back in those orders, numbers compared as numbers ("-0.110 ± …" before "+0.210 ± …",
    which as text would sort the other way)."""
    write_report(store_dir, tmp_path, formats=("html",))
    page = (tmp_path / "report.html").read_text()
    clicks = """<script>
    const table = document.querySelector("#verdict table.sortable"), heads = Array.from(table.tHead.rows[0].cells);
    const order = () => Array.from(table.tBodies[0].rows).map(r => r.cells[1].textContent + " " + r.cells[2].textContent);
    const kl = heads.find(h => h.textContent === "KL"); kl.click(); kl.click();
    const byKl = order();
    const gold = heads.find(h => h.textContent.startsWith("gold")); gold.click();
    document.body.dataset.sorted = JSON.stringify([byKl, order(), gold.dataset.order]);
    </script></body>"""
    (tmp_path / "clicked.html").write_text(page.replace("</body>", clicks))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (tmp_path / "clicked.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    import html as html_module

    found = re.search(r'data-sorted="([^"]*)"', result.stdout)
    assert found, result.stderr[-500:]
    by_kl, by_gold, direction = json.loads(html_module.unescape(found.group(1)))
    # KL: 5.5 for both β = 0.5 rows, 1.5 for both β = 0.1 rows (ties keep the table's order: best gold first)
    assert by_kl == ["dpo 0.5", f"{EVIL} 0.5", "dpo 0.1", f"{EVIL} 0.1"]
    # gold: EVIL 0.5 −0.11, dpo 0.5 +0.21, EVIL 0.1 +0.30, dpo 0.1 +0.35
    assert by_gold == [f"{EVIL} 0.5", "dpo 0.5", f"{EVIL} 0.1", "dpo 0.1"] and direction == "ascending"


def test_cells_from_runs_with_other_settings_are_not_pooled_as_seeds(store_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(store_dir / "results.sqlite", tmp_path / "results.sqlite")
    store = Store(tmp_path / "results.sqlite")
    store.write_cell(
        {"cell_id": "dpo-long", "run_id": "run-1", "variant": "dpo", "plugin": "p", "plugin_version": "1",
         "params": json.dumps({"beta": 0.1}), "beta": 0.1, "seed": 0, "scenario": "clean", "model": "tiny",
         "model_hash": "abc", "device": "cpu", "dtype": "float32", "config": json.dumps({"steps": 400}),
         "status": "done", "error": "", "started": 0.0, "finished": 1.0, "seconds": 1.0},
        [], [{"step": 400, "gold_reward": 0.9, "gold_reward_se": 0.01}],
    )  # fmt: skip
    store.close()
    table = aggregate(cell_finals(read_tidy(tmp_path)), ["gold_reward"]).set_index(["configuration", "beta"])
    assert table.loc[("dpo[steps=400]", 0.1)].gold_reward == pytest.approx(0.9)
    assert table.loc[("dpo[steps=None]", 0.1)].gold_reward == pytest.approx(0.35)  # the two seeds of the first run
    assert table.loc[("dpo[steps=None]", 0.1)].seeds == 2


def test_every_table_and_figure_keeps_a_variants_settings_apart(store_dir: Path, tmp_path: Path) -> None:
    """Cells of one variant with other loss parameters (a --param grid) are separate lines and rows everywhere in
    the report, not only in the ranked summary: the β table once averaged dpo's two settings into one row."""
    shutil.copy(store_dir / "results.sqlite", tmp_path / "results.sqlite")
    store = Store(tmp_path / "results.sqlite")
    for beta, seed, gold in [(0.1, 0, 0.9), (0.1, 1, 0.8), (0.5, 0, 0.6), (0.5, 1, 0.6)]:
        store.write_cell(
            {"cell_id": f"ls-{beta}-{seed}", "run_id": "run-1", "variant": "dpo", "plugin": "p", "plugin_version": "1",
             "params": json.dumps({"beta": beta, "label_smoothing": 0.2}), "beta": beta, "seed": seed,
             "scenario": "clean", "model": "tiny", "model_hash": "abc", "device": "cpu", "dtype": "float32",
             "config": "{}", "status": "done", "error": "", "started": 0.0, "finished": 1.0, "seconds": 1.0},
            [{"step": s, "loss": 2.0, "reward_accuracy": 0.5, "reward_margin": 0.0, "chosen_reward": 0.0,
              "rejected_reward": 0.0, "pairs_per_s": 50.0, "tokens_per_s": 500.0, "peak_memory_mb": 50.0}
             for s in range(1, 21)],
            [{"step": 20, "gold_reward": gold, "gold_reward_se": 0.01, "kl_to_reference": 1.0}],
        )  # fmt: skip
    store.close()
    report = build_report(tmp_path)
    sections = {s.id: s for s in report.sections}
    plain, smoothed = "dpo[label_smoothing=None]", "dpo[label_smoothing=0.2]"
    parameters = dict(zip(*sections["summary"].tables[0][1][["variant", "parameters"]].values.T, strict=True))
    assert parameters[smoothed] == "label_smoothing=0.2" and parameters[plain] == ""  # β has its own column
    beta = sections["beta"].tables[0][1].set_index("variant")
    assert beta.loc[smoothed, 0.1] == pytest.approx(0.85) and beta.loc[plain, 0.1] == pytest.approx(0.35)
    assert beta.loc[plain, 0.5] == pytest.approx(0.21) and EVIL in beta.index
    curves = sections["training"].figures[0].axes[0]
    assert {plain, smoothed} <= {line.get_label() for line in curves.get_lines()}
    # cells timed one after another are not compared on speed: the sweep's range only, and no per-variant table
    assert "no variant is compared on speed" in sections["throughput"].text and not sections["throughput"].tables


def test_the_header_names_each_plugin_with_its_version_and_source() -> None:
    """A loose plugin file is named by its path and the hash of its text (its version), as the run recorded them;
    runs from before the sources were recorded still show the cells' plugin and version."""
    finals = pd.DataFrame({"variant": ["(reference)", "dpo", "ipo", "offset_dpo", "old_one"],
                           "role": ["reference", "variant", "variant", "variant", "variant"],
                           "plugin": ["", "dpo", "dpo", "offset", "legacy"],
                           "plugin_version": ["", "0.1.0", "0.1.0", "file-0123456789ab", "2.0"]})  # fmt: skip
    runs = [{"info": {"plugins": {"dpo": {"version": "0.1.0", "source": "builtin"},
                                  "offset": {"version": "file-0123456789ab", "source": "/home/me/offset.py"}}}},
            {"info": {}}, {"info": "not a dict"}]  # fmt: skip
    assert plugin_sources(finals, runs) == (
        "dpo 0.1.0 (builtin), legacy 2.0, offset file-0123456789ab (/home/me/offset.py)"
    )


def test_the_header_says_how_batches_were_laid_out(store_dir: Path) -> None:
    """A run records whether it shared each pair's prompt; runs that record nothing came before prompt sharing."""
    assert "one row per sequence" in render_html(build_report(store_dir))  # the hand-made run records nothing
    assert batch_layout([{"info": {"share_prompt": True}}]) == "prompt shared (one row per pair)"
    both = [{"info": {"share_prompt": False}}, {"info": {"share_prompt": True}}, {"info": {}}]
    assert batch_layout(both) == "prompt shared (one row per pair) and one row per sequence"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "FILE"], "is not writable (File exists); choose another directory"),
        (["--metric", "gold"], "--metric 'gold': did you mean 'gold_reward'? use one of"),
    ],
)
def test_report_errors_are_one_line(data_store_dir: Path, tmp_path: Path, args: list, message: str) -> None:
    """--to naming a file ended in a FileExistsError traceback; a misspelt metric got no suggestion."""
    import os
    import sys

    (tmp_path / "FILE").write_text("not a folder")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    result = subprocess.run([sys.executable, "-m", "dpobench", "report", str(data_store_dir), *args],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert result.returncode == 2 and message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "FILE").read_text() == "not a folder"


def test_step_cost_labels_long_configurations_once_and_lays_out(recwarn) -> None:
    """A --param grid's labels collapsed a figure with several panels: matplotlib warned that constrained_layout was
    not applied, and labels ran over the neighbouring panels. Each label is drawn once, wrapped, cheapest first, with
    the measurement's verdict on it."""
    import io

    labels = [f"seed_custom_dpo[confidence_weighting={c}, length_normalization={n}, temperature={t}]"
              for c in (False, True) for n in (False, True) for t in (0.5, 1)]  # fmt: skip
    costs = pd.DataFrame({"configuration": labels, "step_ms": 5.0, "x_median": np.linspace(0.9, 1.1, 8),
                          "x_low": 0.8, "x_high": 1.2, "rounds": 7, "differs": ["cheaper"] + [""] * 7})  # fmt: skip
    memory = pd.DataFrame({"variant": labels, "device": "cuda", "peak_memory_mb": 100.0})
    fig = figures.throughput(costs, figures.variant_colors(["seed_custom_dpo"]), "cuda", memory)
    fig.savefig(io.BytesIO(), format="svg")
    assert not [w for w in recwarn if "constrained_layout not applied" in str(w.message)]
    shown = [t.get_text().replace("\n", " ") for t in fig.axes[0].get_yticklabels()]
    assert shown == [f"{labels[0]} (cheaper)", *labels[1:]]
    assert [ax.get_xlabel() for ax in fig.axes] == [
        "step time / the median configuration's, same round (dot: median, line: least to most over rounds)",
        "peak memory (MiB)",
    ]


def test_the_step_cost_table_compares_configurations_within_each_round(tmp_path: Path) -> None:
    """Four configurations over six rounds of the latest run (an older run's rounds are left out): a 8 ms, b 10,
    c 12, d alternating 9 and 13. Round medians: 9.5 where d is 9, 11 where d is 13. Ratios: a 0.842 / 0.727 (every
    round below 1: cheaper), b 1.053 / 0.909, c 1.263 / 1.091 (every round above: dearer), d 0.947 / 1.182. Five
    rounds are too few for a sign test at 5% (2 × 0.5⁵ = 0.0625): nothing differs then."""
    from dpobench.tables import step_cost_table

    store = Store(tmp_path / "results.sqlite")
    for run_id in ("old", "new"):
        store.add_run(run_id, config={})
    store.write_step_costs(
        "old", [{"variant": "a", "params": "{}", "round": r, "step_time_ms": 99.0} for r in range(6)]
    )
    times = {"a": [8] * 6, "b": [10] * 6, "c": [12] * 6, "d": [9, 13] * 3}
    store.write_step_costs("new", [{"variant": v, "params": "{}", "round": r, "step_time_ms": float(ms)}
                                   for v, values in times.items() for r, ms in enumerate(values)])  # fmt: skip
    store.close()
    table = step_cost_table(tmp_path).set_index("configuration")
    assert list(table.index) == ["a", "b", "d", "c"] and table.attrs["run_id"] == "new"
    ranges = {"a": (8 / 11, 8 / 9.5), "b": (10 / 11, 10 / 9.5), "c": (12 / 11, 12 / 9.5), "d": (9 / 9.5, 13 / 11)}
    for name, (least, most) in ranges.items():
        row = table.loc[name]
        np.testing.assert_allclose([row.x_low, row.x_high, row.x_median], [least, most, (least + most) / 2])
    assert table.differs.to_dict() == {"a": "cheaper", "b": "", "d": "", "c": "dearer"}
    assert table.step_ms.to_dict() == {"a": 8.0, "b": 10.0, "d": 11.0, "c": 12.0} and (table.rounds == 6).all()
    store = Store(tmp_path / "results.sqlite")
    store.write_step_costs("new", [{"variant": v, "params": "{}", "round": r, "step_time_ms": float(ms)}
                                   for v, values in times.items() for r, ms in enumerate(values[:5])])  # fmt: skip
    store.close()
    assert (step_cost_table(tmp_path).differs == "").all()  # the measurement replaced: five rounds each


def test_one_gold_value_among_seeds_gets_its_own_cells_interval() -> None:
    """Of two finished seeds, only the second measured a gold reward: its interval is 1.96 × its own standard
    error, not the first cell's (which was NaN, and made the interval silently NaN)."""
    finals = pd.DataFrame({"variant": "dpo", "configuration": "dpo", "beta": 0.1, "scenario": "clean",
                           "status": "done", "seed": [0, 1], "gold_reward": [math.nan, 0.3],
                           "gold_reward_se": [math.nan, 0.02]})  # fmt: skip
    row = aggregate(finals, ["gold_reward"]).iloc[0]
    assert row.gold_reward == pytest.approx(0.3) and row.gold_reward_ci == pytest.approx(1.96 * 0.02)


def test_pdf_tables_keep_every_column_and_name_each_row_on_every_page() -> None:
    """A table wider than a page goes onto several, each with the row-naming columns; it used to keep the first 12
    columns only, so the PDF's ranked summary lost its rank. A column of long cells (the parameters) gets a page of
    its own instead of being cut at 28 characters; past 110, cells are cut visibly."""
    from dpobench.report import _table_pages

    columns = ["rank", "variant", "configuration", "parameters", *(f"m{i}" for i in range(20))]
    table = pd.DataFrame([[1, "dpo", "dpo", "x" * 40, *range(20)], [2, "ipo", "ipo", "", *range(20, 40)]],
                         columns=columns)  # fmt: skip
    pages = _table_pages("Summary: ranked summary", table, columns_per_page=14)
    assert len(pages) == 3  # 20 short columns, 11 per page beside the 3 names; the long one on a page of its own
    shown = []
    for page in pages:
        cells = page.axes[0].tables[0].get_celld()
        header = [cells[0, c].get_text().get_text() for c in range(max(col for _, col in cells) + 1)]
        assert header[:3] == ["rank", "variant", "configuration"]
        shown += header[3:]
        rows = [[cells[r, c].get_text().get_text() for c in range(len(header))] for r in (1, 2)]
        assert [row[:3] for row in rows] == [["1", "dpo", "dpo"], ["2", "ipo", "ipo"]]
    assert shown == [*columns[4:], "parameters"]
    last = pages[2].axes[0].tables[0].get_celld()
    assert last[1, 3].get_text().get_text() == "x" * 40  # whole, on its own page
    assert pages[2]._suptitle.get_text() == "Summary: ranked summary (rows 1–2 of 2, columns 3 of 3)"
    cut = _table_pages("t", table.assign(parameters="y" * 200))[-1].axes[0].tables[0].get_celld()
    assert cut[1, 3].get_text().get_text() == "y" * 109 + "…"


def test_the_summary_defines_its_columns_and_names_degenerate_samples(store_dir: Path) -> None:
    """The summary's text says what each column means and which way is better, and names the configurations
    whose samples are mostly ungrammatical; every section's text is in the PDF too, on a page of its own."""
    from dpobench.report import _degenerate, _glossary_pages, _text_page

    table = pd.DataFrame({"configuration": ["dpo", "apo_down", "ipo"], "grammatical_fraction": [0.9, 0.0, 0.49]})
    assert _degenerate(table) == (
        "Degenerate samples: under half of the samples of apo_down (0%), ipo (49%) are grammatical; read their gold "
        "reward with that in mind. "
    )
    assert _degenerate(table.iloc[:1]) == "" and _degenerate(table.drop(columns="grammatical_fraction")) == ""
    report = build_report(store_dir)
    first = report.sections[0]  # the verdict comes first: the picks, then the rules they follow
    assert first.id == "verdict" and first.lines[0].startswith("Most reward: dpo β=0.1 (gold +0.350")
    # two seeds: the interval rule, stated where the table is; then the reference's score and the picking rules
    assert first.text.startswith("Rank: configurations whose 95% intervals overlap their rank's leader")
    assert "scores a gold reward of +0.000 (KL 0)" in first.text and "How these are chosen:" in first.text
    summary = next(s for s in report.sections if s.id == "summary")
    assert "gold_reward (higher is better), kl_to_reference (lower is better)" in summary.text
    ((_, ranked),) = summary.tables
    glossary = dict(summary.glossary)
    assert list(glossary)[:2] == ["gold_reward", "kl_to_reference"]  # the summary's columns first, in its order
    assert glossary["kl_to_reference"] == (
        "the KL from the SFT reference, estimated on the same samples (mean of log π − log π_ref), per completion; "
        "lower keeps closer to it (nats; lower is better; the last evaluation's)"
    )
    assert glossary["grad_norm"] == "the gradient's global L2 norm before clipping (no unit; the mean of the last 10% of " \
        "training steps)"  # fmt: skip
    # every metric column of summary.csv is defined (so every metric column of the ranked summary is)
    finals = cell_finals(read_tidy(store_dir))
    metric_columns = [c for c in finals.columns if c not in (*CELL_COLUMNS, "role")]
    assert sorted(glossary) == sorted(metric_columns) and set(ranked.columns) & set(metric_columns) <= set(glossary)
    html = render_html(report)
    assert "<dt>kl_to_reference</dt>\n<dd>the KL from the SFT reference" in html
    pages = _glossary_pages("Summary: glossary", summary.glossary)
    texts = [t.get_text() for page in pages for t in page.texts if t.get_text() != "Summary: glossary"]
    assert texts[:2] == [
        "gold_reward",
        "    the synthetic task's true reward of one sampled completion per evaluation prompt, averaged (each",
    ]
    assert sum(t in glossary for t in texts) == len(glossary)  # every term, on pages of 48 lines at most
    assert all(len(page.texts) <= 49 for page in pages)
    page = _text_page(summary.title, summary.text)
    assert page.texts[0].get_text() == "Summary"
    assert " ".join(t.get_text() for t in page.texts[1:]) == " ".join(summary.text.split())


def test_a_parameter_study_needs_two_configurations() -> None:
    """A declared study (``LossSpec.study``) compares the configurations of its parameters: with one configuration
    it drew four panels of one bar each, and no figure is drawn now; with two, each panel has both, in the order of
    the study's labels, and a configuration without a label is named by its values."""
    study = Study(params=("length_normalization", "confidence_weighting"), title="the study",
                  labels={(False, False): "standard", (True, True): "full"})  # fmt: skip
    params = lambda ln, cw: json.dumps({"length_normalization": ln, "confidence_weighting": cw})  # noqa: E731
    cells = pd.DataFrame({"variant": "custom", "status": "done", "params": [params(True, True)],
                          "loss": [0.5], "reward_margin": [1.0], "reward_accuracy": [0.8], "gold_reward": [0.3]})  # fmt: skip
    assert figures.parameter_study(cells, "custom", study) is None
    two = pd.concat([cells, cells.assign(params=params(False, False), loss=0.7, gold_reward=0.1)], ignore_index=True)
    fig = figures.parameter_study(two, "custom", study)
    heights = [[bar.get_height() for bar in ax.patches] for ax in fig.axes]
    assert heights == [[0.7, 0.5], [1.0, 1.0], [0.8, 0.8], [0.1, 0.3]]  # standard, then full
    assert fig._suptitle.get_text() == "the study" and fig.axes[3].get_ylabel() == "gold reward of samples (−1…1)"
    three = pd.concat([two, cells.assign(params=params(True, False), loss=0.9)], ignore_index=True)
    names = [t.get_text() for t in figures.parameter_study(three, "custom", study).axes[0].get_xticklabels()]
    assert names == ["standard", "full", "length_normalization=True, confidence_weighting=False"]
    assert figures.parameter_study(three, "other", study) is None  # only the variant's own cells


def test_peak_memory_is_shown_for_cuda_only() -> None:
    """On the CPU a cell's peak memory is the process's peak RSS so far, inherited from the cells before it (about
    the same 530 MB for every variant of the default run): the table leaves it out there, and keeps CUDA's
    max_memory_allocated."""
    from dpobench.tables import throughput_table

    def finals(device: str) -> pd.DataFrame:
        return pd.DataFrame({"variant": ["dpo", "ipo"], "device": device, "status": "done", "pairs_per_s": [2.0, 1.0],
                             "tokens_per_s": [20.0, 10.0], "step_time_ms": [5.0, 10.0], "peak_memory_mb": [300.0, 200.0]})  # fmt: skip

    cpu, cuda = throughput_table(finals("cpu")), throughput_table(finals("cuda"))
    assert "peak_memory_mb" not in cpu and cuda.peak_memory_mb.tolist() == [300.0, 200.0]


def test_frontier_tells_33_named_variants_apart_and_keeps_the_largest_kl_in_frame() -> None:
    """With more variants than the palettes' distinct colours, each named variant's (colour, marker) pair is its own,
    and none is grey (grey means "not named"); the point at the largest KL (apo_down's 185 nats in the default run)
    lies inside the axes, not on the frame."""
    from matplotlib.colors import to_rgba

    names = [f"v{i:02d}" for i in range(33)]
    colors = figures.variant_colors(names)
    markers = figures.variant_markers(colors)
    assert len({(colors[n], markers[n]) for n in names}) == 33
    assert all(len(set(c[:3])) > 1 for c in colors.values())  # no grey among the variants' colours
    table = pd.DataFrame({"variant": names, "configuration": names, "beta": 0.1, "scenario": "clean",
                          "kl_to_reference": np.linspace(0.1, 185.5, 33), "gold_reward": 0.2, "gold_reward_ci": 0.05})  # fmt: skip
    ax = figures.frontier(table, colors, 0.0, own=set(names)).axes[0]
    assert ax.get_xlim()[1] > 185.5 * 1.5
    drawn = [(to_rgba(c.lines[0].get_color()), c.lines[0].get_marker()) for c in ax.containers]
    assert drawn == [(colors[n], markers[n]) for n in names]
    assert len(ax.texts) == figures.MOST_NAMED  # the column of names holds 16; the rest are named on hover


def test_one_diverging_cell_does_not_flatten_the_training_curves_and_is_named() -> None:
    """Twelve variants whose reward margins rise to 0.08–0.19 and one whose margin dives to −7 (the default run had
    such a grey outlier): the margin panel keeps the twelve's range, and its title names the one that leaves it."""
    rows = [{"variant": f"v{i:02d}", "scenario": "clean", "beta": 0.1, "source": "step", "step": step, "metric": m,
             "value": (-7.0 * step / 20 if i == 12 and m == "reward_margin" else 0.01 * (i + 8) * step / 20)}
            for i in range(13) for step in range(1, 21)
            for m in ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")]  # fmt: skip
    tidy = pd.DataFrame(rows)
    fig = figures.training_curves(tidy, figures.variant_colors(tidy.variant.unique()), highlight=["v00"])
    margin = fig.axes[1]
    low, high = margin.get_ylim()
    # drawn: 10-step rolling means, from v00's 0.004 at step 1 to v11's 0.19 × 15.5 / 20 at step 20; padded by 5%
    pad = 0.05 * (0.19 * 15.5 / 20 - 0.004)
    np.testing.assert_allclose([low, high], [0.004 - pad, 0.19 * 15.5 / 20 + pad])
    assert margin.get_title() == "leaves the scale: v12"
    assert fig.axes[3].get_title() == ""  # its rewards are the others' kind: nothing left out there
    assert figures.robust_limits([0.0, 1.0]) == (-0.05, 1.05)


def test_geometry_draws_each_variant_at_the_beta_it_trained_with() -> None:
    """SimPO's default β is 2, and the default run trains every variant at 0.1: the report's geometry drew β = 2,
    a loss that was never trained. It draws the trained β now, the default only where none is given."""
    from dpobench.landscape import landscape
    from dpobench.plugins import get_losses

    frame = landscape([get_losses()["simpo"]], betas=(0.1, 0.5), margins=(-1.0, 0.0, 1.0))
    colors = figures.variant_colors(["simpo"])
    trained = figures.geometry(frame, colors, "reference_free", betas={"simpo": 0.1}).axes[0].get_lines()[0]
    default = figures.geometry(frame, colors, "reference_free").axes[0].get_lines()[0]
    assert trained.get_label() == "simpo (β=0.1)" and default.get_label() == "simpo (β=2)"
    at = frame[np.isclose(frame.beta, 0.1)].sort_values("margin")
    assert list(trained.get_ydata()) == at.loss.tolist()


def test_paired_ranking_tells_apart_what_overlapping_intervals_do_not() -> None:
    """Three configurations evaluated on the same 6 prompts. The prompts vary a lot (±0.9), so every unpaired
    interval overlaps the leader's and the interval rule ties all three. Prompt by prompt, b trails a by exactly
    0.05 (no spread: a is better), and c differs from a by 0.1 ∓ 0.3 alternately and from b by 0.05 ∓ 0.3: mean gaps
    within t(5) × 0.3286 / √6 = 0.345, so nothing is better than c. Rank = 1 + the number of rows better: a 1,
    b 2, c 1 (though c's mean is lower than b's: nothing beats it)."""
    from dpobench.tables import paired_rank

    base = np.array([0.9, -0.9, 0.5, -0.5, 0.7, -0.7])
    a, b = base + 0.1, base + 0.05
    c = base + np.array([0.3, -0.3, 0.3, -0.3, 0.3, -0.3])
    table = pd.DataFrame({"gold_reward": [x.mean() for x in (a, b, c)]}, index=["a", "b", "c"])
    unpaired_ci = pd.Series([1.96 * x.std(ddof=1) / math.sqrt(6) for x in (a, b, c)], index=table.index)
    assert rank(table.assign(gold_reward_ci=unpaired_ci), "gold_reward").tolist() == [1, 1, 1]
    ranks, gap, gap_ci = paired_rank(table, "gold_reward", {"a": a, "b": b, "c": c})
    assert ranks.tolist() == [1, 2, 1]
    assert gap.tolist() == pytest.approx([0.0, 0.05, 0.1])  # the best row's gold reward minus each one's, paired
    sd = np.array([0.3, -0.3] * 3).std(ddof=1)
    assert math.isnan(gap_ci["a"]) and gap_ci["b"] == pytest.approx(0.0, abs=1e-15)
    assert gap_ci["c"] == pytest.approx(2.571 * sd / math.sqrt(6))  # t(0.975, 5 df)
    same, _, _ = paired_rank(table.iloc[:2], "gold_reward", {"a": a, "b": a.copy()})
    assert same.tolist() == [1, 1]  # identical samples: a gap of 0 is no difference
    partial, _, _ = paired_rank(table, "gold_reward", {"a": a, "b": b})  # c without samples: no rank, no effect
    assert partial.tolist()[:2] == [1, 2] and partial.isna().tolist() == [False, False, True]


def test_the_report_ranks_one_seed_runs_by_paired_differences(tmp_path: Path) -> None:
    """A store keeps each final evaluation's per-prompt gold rewards; the summary of one-seed cells ranks by their
    paired differences and says so, and a store without samples (written before) keeps the interval rule."""
    from dpobench.metrics import by_source
    from dpobench.tables import read_samples

    store = Store(tmp_path / "results.sqlite")
    store.add_run("run-1", command="dpobench run", config={}, dpobench_version="0.1.0", torch_version="2.13.0",
                  transformers_version="5.24.0", model="tiny", model_hash="abc", device="cpu", dtype="float32")  # fmt: skip
    base = np.array([0.9, -0.9, 0.5, -0.5, 0.7, -0.7])
    for variant, shift in (("a", 0.1), ("b", 0.05)):
        gold = (base + shift).tolist()
        cell = {"cell_id": variant, "run_id": "run-1", "variant": variant, "plugin": "p", "plugin_version": "1",
                "params": "{}", "beta": 0.1, "seed": 0, "scenario": "clean", "model": "tiny", "model_hash": "abc",
                "device": "cpu", "dtype": "float32", "config": "{}", "status": "done", "error": "", "started": 0.0,
                "finished": 1.0, "seconds": 1.0}  # fmt: skip
        evaluation = {**dict.fromkeys(by_source("eval"), 0.5), "step": 10, "gold_reward": float(np.mean(gold)),
                      "gold_reward_se": float(np.std(gold, ddof=1) / math.sqrt(6)), "gold_samples": gold}  # fmt: skip
        steps = [{**dict.fromkeys(by_source("step"), 0.5), "step": s} for s in range(1, 11)]
        store.write_cell(cell, steps, [{"step": 5, "gold_samples": [0.0] * 6}, evaluation])
    store.close()
    samples = read_samples(tmp_path)
    assert samples.groupby("cell_id").gold_reward.apply(list).to_dict() == {
        "a": (base + 0.1).tolist(),
        "b": (base + 0.05).tolist(),
    }
    finals = cell_finals(read_tidy(tmp_path))
    paired = summary_table(finals, "gold_reward", samples)
    assert paired.set_index("variant")["rank"].to_dict() == {"a": 1, "b": 2}
    assert paired.set_index("variant").gold_reward_gap["b"] == pytest.approx(0.05)
    assert summary_table(finals, "gold_reward").set_index("variant")["rank"].to_dict() == {"a": 1, "b": 1}
    text = next(s for s in build_report(tmp_path).sections if s.id == "summary").text
    assert "In scenario clean, every configuration is one cell evaluated on the same prompts, so a configuration's " \
        "rank is 1 + the number of configurations better than it by their paired difference" in text  # fmt: skip
    assert "intervals overlap" not in text
    assert "gold_reward_gap" not in summary_table(finals, "kl_to_reference", samples)  # the gold reward's only

    # a failed row has no rank, and the others stay paired; a row whose samples differ in length turns pairing off
    failed = pd.concat([finals, finals.iloc[:1].assign(cell_id="f", variant="f", status="failed")], ignore_index=True)
    ranked = summary_table(failed, "gold_reward", samples).set_index("variant")
    assert ranked["rank"].tolist()[:2] == [1, 2] and pd.isna(ranked.at["f", "rank"])
    assert ranked.gold_reward_gap.notna().sum() == 2
    short = pd.concat([samples[samples.cell_id == "a"], samples[samples.cell_id == "b"].iloc[:5]])
    assert "gold_reward_gap" not in summary_table(finals, "gold_reward", short)
    # a variant without β (a plugin loss need not have one): its row still finds its cell
    no_beta = summary_table(finals.assign(beta=math.nan), "gold_reward", samples).set_index("variant")
    assert no_beta["rank"].to_dict() == {"a": 1, "b": 2}


def test_training_curves_colour_the_best_ranked_when_there_are_many() -> None:
    """33 coloured lines could not be told apart: beyond 10 variants, the report's best-ranked are in colour (the
    legend in rank order) and the rest grey under one entry; up to 10, every line has its colour."""
    rows = [{"variant": f"v{i:02d}", "scenario": "clean", "beta": 0.1, "source": "step", "step": step, "metric": m,
             "value": float(i + step)}
            for i in range(12) for step in (1, 2)
            for m in ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")]  # fmt: skip
    tidy = pd.DataFrame(rows)
    colors = figures.variant_colors(tidy.variant.unique())
    fig = figures.training_curves(tidy, colors, highlight=["v05", "v00", "v11"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["v05", "v00", "v11", "others (9)"]
    lines = fig.axes[0].get_lines()
    coloured = {line.get_label(): line.get_color() for line in lines if line.get_color() != "0.7"}
    assert coloured == {v: colors[v] for v in ("v05", "v00", "v11")}
    assert len(lines) == 12 and list(lines[-1].get_ydata()) == [
        12.0,
        12.5,
    ]  # v11, last (on top): i + step, rolling mean
    few = tidy[tidy.variant.isin([f"v{i:02d}" for i in range(10)])]
    assert len(figures.training_curves(few, colors, highlight=["v00"]).legends[0].get_texts()) == 10
