"""The results store and the metric catalogue: a store written before the catalogue (schema 1, committed in
tests/data/) reads as it did, migrates, resumes and reports; the store refuses what the catalogue does not know;
a metric added to the catalogue reaches every view; the reference is a role, not a label."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from dpobench.metrics import METHOD_METRICS, METRICS, SUMMARY, TERMINAL, Metric, by_source, rankable, register
from dpobench.report import build_report, write_report
from dpobench.store import SCHEMA_VERSION, Store, StoreError
from dpobench.tables import (
    cell_finals,
    glossary_table,
    read_samples,
    read_tidy,
    summary_csv,
    summary_table,
    variant_table,
)

DATA = Path(__file__).parent / "data"
#: written by ``dpobench --plugins-dir tests/plugins run --variants dpo,ipo,seed_custom_dpo,nan_loss --param
#: seed_custom_dpo.temperature=0.5,1 --steps 12 --batch-size 8 --eval-every 6`` before the catalogue, with its
#: summary.csv beside it
SCHEMA_1 = DATA / "store_v0.sqlite"
SCHEMA_1_SUMMARY = DATA / "store_v0_summary.csv"


def schema_1_copy(tmp_path: Path) -> Path:
    """A copy to open: opening for writing migrates the file."""
    path = tmp_path / "results.sqlite"
    shutil.copy(SCHEMA_1, path)
    return path


def csv_text(frame: pd.DataFrame) -> str:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue()


#: catalogue metrics added after the old code wrote SCHEMA_1_SUMMARY: its cells never measured them
ADDED_SINCE = {
    "distinct_2",
    "repetitive_fraction",
    "eval_seconds",
    "proxy_reward",
    "rollout_kl",
    "rollout_reward",
    "samples_per_s",
    "value_loss",
}


def as_the_old_code_wrote(finals: pd.DataFrame) -> str:
    """The finals as summary.csv text in the old file's columns; the columns beyond them are the metrics added since,
    empty for the old cells."""
    summary = summary_csv(finals)
    old_columns = SCHEMA_1_SUMMARY.read_text().splitlines()[0].split(",")
    assert set(summary.columns) - set(old_columns) == ADDED_SINCE
    assert summary[sorted(ADDED_SINCE)].isna().all().all()
    return csv_text(summary[old_columns])


def schema_1_values() -> tuple[dict, list]:
    """The committed store's non-NULL metric values and per-prompt gold rewards, read with plain SQL (schema 1's
    layout: a column per metric)."""
    values = {}
    with sqlite3.connect(f"file:{SCHEMA_1}?mode=ro", uri=True) as db:
        for table, source in (("steps", "step"), ("evaluations", "eval")):
            cursor = db.execute(f"SELECT * FROM {table}")
            names = [d[0] for d in cursor.description]
            for row in cursor:
                record = dict(zip(names, row, strict=True))
                for metric, value in record.items():
                    if metric not in ("cell_id", "step") and value is not None:
                        values[(record["cell_id"], source, record["step"], metric)] = value
        samples = db.execute("SELECT cell_id, step, prompt, gold_reward FROM samples ORDER BY 1, 2, 3").fetchall()
    return values, samples


def test_a_schema_1_store_reads_as_before_without_being_changed(tmp_path: Path) -> None:
    """Read-only, an old store is read as it is: its finals are the summary.csv the old code wrote from it, byte for
    byte, and the file is not touched (a report of an old store does not migrate it)."""
    path = schema_1_copy(tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    finals = cell_finals(read_tidy(tmp_path))
    assert as_the_old_code_wrote(finals) == SCHEMA_1_SUMMARY.read_text()
    assert finals.set_index("variant").role.to_dict()["(reference)"] == "reference"
    assert (finals.role == "reference").sum() == 1
    with Store(tmp_path, readonly=True) as store:
        assert store.schema == 1
        assert store.step_costs().empty  # measured side by side by later versions only: none, and no error
        with pytest.raises(StoreError, match="opened read-only"):
            store.add_run("x")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_schema_1_store_migrates_when_opened_for_writing(tmp_path: Path) -> None:
    """Opened for writing, the old store's columns become long rows (every non-NULL value once, none other), its
    per-prompt gold rewards per-prompt values, the reference cell its role; the finals stay byte for byte the old
    summary.csv, and a second opening changes nothing."""
    path = schema_1_copy(tmp_path)
    values, samples = schema_1_values()
    Store(path).close()
    with sqlite3.connect(path) as db:
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        kinds = dict(db.execute("SELECT name, type FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())
        rows = db.execute("SELECT cell_id, source, step, metric, value FROM measurements").fetchall()
        per_prompt = db.execute("SELECT cell_id, step, prompt, value FROM prompt_values WHERE metric = 'gold_reward' "
                                "ORDER BY 1, 2, 3").fetchall()  # fmt: skip
        roles = dict(db.execute("SELECT variant, role FROM cells WHERE variant != 'seed_custom_dpo'").fetchall())
        view_losses = db.execute("SELECT COUNT(*), SUM(loss) FROM steps").fetchone()
    assert int(version) == SCHEMA_VERSION == 2
    assert kinds == {"meta": "table", "runs": "table", "cells": "table", "measurements": "table",
                     "prompt_values": "table", "step_costs": "table", "steps": "view", "evaluations": "view"}  # fmt: skip
    assert {(c, s, st, m): v for c, s, st, m, v in rows} == values and len(rows) == len(values) == 646
    assert per_prompt == samples and len(samples) == 9 * 256  # 4 cells × 2 evaluations and the reference's one
    assert roles == {"(reference)": "reference", "dpo": "variant", "ipo": "variant", "nan_loss": "variant"}
    # the wide view has the old table's rows: 4 trained cells × 12 steps, and the same losses
    old_losses = sum(v for (_, s, _, m), v in values.items() if s == "step" and m == "loss")
    assert view_losses[0] == 48 and view_losses[1] == pytest.approx(old_losses, rel=1e-15)
    assert as_the_old_code_wrote(cell_finals(read_tidy(path))) == SCHEMA_1_SUMMARY.read_text()
    migrated = path.read_bytes()
    Store(path).close()
    assert path.read_bytes() == migrated


def test_a_schema_1_store_resumes_and_reports(tmp_path: Path, untrained_model: Path) -> None:
    """After migration a sweep knows the old store's finished cells (done and diverged: a rerun skips them), adds
    its own cells beside them (every metric the trainer and the evaluator return is in the catalogue, or the store
    would refuse it) and skips them when rerun; the report compares old and new."""
    from dpobench.config import SweepConfig, TrainConfig
    from dpobench.data import DataRecipe
    from dpobench.sweep import run_sweep

    path = schema_1_copy(tmp_path)
    old = pd.read_csv(SCHEMA_1_SUMMARY)
    with Store(path) as store:
        assert all(store.finished(c) for c in old.cell_id)  # nan_loss's "diverged" included: no retry
        assert not store.finished("no-such-cell")
    config = SweepConfig(variants=("hinge",), model=str(untrained_model), train=TrainConfig(steps=2, batch_size=8),
                         data_recipe=DataRecipe(train_prompts=64, heldout_prompts=16, eval_prompts=16))  # fmt: skip
    messages: list[str] = []
    first = run_sweep(config, tmp_path, progress=messages.append)
    assert "1 cell, 0 already in the store, 1 to run" in messages
    assert sorted(first.variant) == ["(reference)", "hinge"] and first.role.tolist().count("reference") == 1
    messages.clear()
    run_sweep(config, tmp_path, progress=messages.append)
    assert "1 cell, 1 already in the store, 0 to run" in messages
    tidy = read_tidy(tmp_path)
    new = tidy[tidy.cell_id.isin(first.cell_id) & tidy.metric.notna()]
    assert set(new[new.source == "step"].metric) == set(by_source("step")) - set(METHOD_METRICS)  # the trainer's step
    assert set(new[new.source == "eval"].metric) == set(by_source("eval")) - set(METHOD_METRICS)  # the evaluator
    finals = cell_finals(tidy).set_index("cell_id").loc[old.cell_id].reset_index()
    assert as_the_old_code_wrote(finals) == SCHEMA_1_SUMMARY.read_text()  # the old cells, as the old code had them
    report = build_report(tmp_path)
    sections = {s.id: s for s in report.sections}
    ranked = sections["summary"].tables[0][1]
    assert {"dpo", "ipo", "hinge"} <= set(ranked.variant) and "(reference)" not in set(ranked.variant)
    assert sections["failures"].tables[0][1].variant.tolist() == ["nan_loss"]
    assert report.header[4] == ("cells", "6 (1 failed or diverged)")  # 5 of the old run and hinge; 2 references
    written = write_report(tmp_path, tmp_path / "report", formats=("html",))
    assert "ipo" in written[0].read_text() and "hinge" in written[0].read_text()


def cell(cell_id: str, variant: str, **extra: object) -> dict[str, object]:
    return {"cell_id": cell_id, "run_id": "run-1", "variant": variant, "plugin": "p", "plugin_version": "1",
            "params": "{}", "beta": 0.1, "seed": 0, "scenario": "clean", "model": "tiny", "model_hash": "abc",
            "device": "cpu", "dtype": "float32", "config": "{}", "status": "done", "error": "", "started": 0.0,
            "finished": 1.0, "seconds": 1.0, **extra}  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "results.sqlite")
    store.add_run("run-1", command="dpobench run", config={}, model="tiny", model_hash="abc", device="cpu",
                  dtype="float32")  # fmt: skip
    yield store
    store.close()


@pytest.mark.parametrize(
    ("steps", "evaluations", "message"),
    [
        ([{"step": 1, "loss": 0.5, "los": 0.4}], [], "training step 1 has 'los', which is not in the metric catalogue"),
        (
            [{"step": 1, "gold_reward": 0.5}],
            [],
            "'gold_reward' is measured at each evaluation, but came with training step 1",
        ),
        ([], [{"step": 3, "loss": 0.5}], "'loss' is measured at each training step, but came with evaluation 3"),
        ([{"loss": 0.5}], [], "a training step without its step number"),
        ([{"step": 1, "gold_samples": [0.1]}], [], "training step 1 has 'gold_samples', which is not in the metric"),
    ],
)
def test_the_store_refuses_what_the_catalogue_does_not_know(store: Store, steps, evaluations, message) -> None:
    """A value under a name the catalogue lacks, or of the wrong source, is refused before anything is written: a
    store that dropped it would lose a measurement silently."""
    with pytest.raises(StoreError, match=message.replace("(", r"\(")):
        store.write_cell(cell("c", "dpo"), steps, evaluations)
    assert store.cells().empty and store.measurements().empty
    with pytest.raises(StoreError, match="role 'baseline'; a cell is one of variant, reference"):
        store.write_cell(cell("c", "dpo", role="baseline"), [], [])
    with pytest.raises(StoreError, match="no cell column 'colour'"):
        store.write_cell(cell("c", "dpo", colour="red"), [], [])


def test_nan_is_kept_as_measured_and_a_missing_metric_is_absent(store: Store) -> None:
    """A metric measured as NaN is a row with a NULL value; a metric not measured (no gold reward with pairs from
    --data) has no row. Both read as NaN in the finals."""
    store.write_cell(cell("c", "dpo"), [{"step": 1, "loss": 0.5, "grad_norm": math.nan}],
                     [{"step": 1, "kl_to_reference": 0.25, "gold_reward_se": float("nan")}])  # fmt: skip
    rows = store.measurements()
    assert sorted(rows.metric) == ["gold_reward_se", "grad_norm", "kl_to_reference", "loss"]
    assert rows.set_index("metric").value.isna().to_dict() == {"gold_reward_se": True, "grad_norm": True,
                                                               "kl_to_reference": False, "loss": False}  # fmt: skip
    store.close()
    final = cell_finals(read_tidy(store.path)).iloc[0]
    assert final.loss == 0.5 and final.kl_to_reference == 0.25
    assert math.isnan(final.grad_norm) and math.isnan(final.gold_reward) and math.isnan(final.gold_reward_se)


def test_the_reference_is_a_role_not_a_label(store: Store) -> None:
    """Every view finds the reference model by its cell's role: named "SFT model" here, it still heads the terminal
    table and is left out of the ranking; a variant that happens to be called "(reference)" is ranked."""
    evaluation = {"step": 0, "gold_reward": 0.1, "gold_reward_se": 0.01, "kl_to_reference": 0.0}
    store.write_cell(cell("ref", "SFT model", role="reference"), [], [evaluation])
    store.write_cell(cell("a", "(reference)"), [{"step": 1, "loss": 0.5}], [{**evaluation, "step": 1,
                                                                             "gold_reward": 0.3}])  # fmt: skip
    store.write_cell(cell("b", "dpo"), [{"step": 1, "loss": 0.5}], [{**evaluation, "step": 1, "gold_reward": 0.2}])
    store.close()
    finals = cell_finals(read_tidy(store.path))
    assert finals.role.tolist() == ["reference", "variant", "variant"]
    assert summary_table(finals).variant.tolist() == ["(reference)", "dpo"]
    assert variant_table(finals).variant.tolist() == ["SFT model", "(reference)", "dpo"]
    report = build_report(store.path)
    assert (
        "The SFT reference scores a gold reward of +0.100" in next(s for s in report.sections if s.id == "summary").text
    )


@pytest.fixture
def distinct_bigrams(monkeypatch):
    """A metric the catalogue does not have: one entry, as an author adds it to ``metrics._CATALOGUE``."""
    metric = Metric("distinct_bigrams", "eval", "distinct bigrams", "fraction", "higher", ".2f",
                    "the fraction of the samples' bigrams that occur once (diversity)", short="dist-2")  # fmt: skip
    monkeypatch.setitem(METRICS, metric.name, metric)
    return metric


def test_adding_a_metric_is_one_catalogue_entry(tmp_path: Path, distinct_bigrams: Metric) -> None:
    """With one entry added, a value for it goes through the store, and it is in the tidy frame, the finals, the
    columns of summary.csv (evaluation's, by name), the wide view, --metric's choices, the report's glossary, and
    can rank the summary; nothing else was edited."""
    with Store(tmp_path / "results.sqlite") as store:
        store.add_run("run-1", command="", config={}, model="tiny", model_hash="abc", device="cpu", dtype="float32")
        for variant, values in (("dpo", (0.40, 0.50)), ("ipo", (0.70, 0.60))):
            store.write_cell(cell(variant, variant), [{"step": 1, "loss": 0.5}],
                             [{"step": 5, "gold_reward": 0.1, "distinct_bigrams": values[0]},
                              {"step": 10, "gold_reward": 0.1, "distinct_bigrams": values[1]}])  # fmt: skip
        view = store.frame("evaluations")
    assert view.set_index(["cell_id", "step"]).distinct_bigrams.to_dict() == {
        ("dpo", 5): 0.40, ("dpo", 10): 0.50, ("ipo", 5): 0.70, ("ipo", 10): 0.60}  # fmt: skip
    tidy = read_tidy(tmp_path)
    assert tidy[tidy.metric == "distinct_bigrams"].value.tolist() == [0.40, 0.50, 0.70, 0.60]
    finals = cell_finals(tidy)
    assert finals.set_index("variant").distinct_bigrams.to_dict() == {"dpo": 0.50, "ipo": 0.60}  # the last evaluation
    columns = list(summary_csv(finals).columns)
    assert columns[columns.index("chosen_logp") :] == [*by_source("step"), *by_source("eval")]
    assert columns.index("distinct_bigrams") == columns.index("eval_seconds") - 1  # evaluation's, by name
    assert "distinct_bigrams" in rankable()
    ranked = summary_table(finals, "distinct_bigrams")
    assert ranked[["variant", "distinct_bigrams", "rank"]].values.tolist() == [["ipo", 0.60, 1], ["dpo", 0.50, 2]]
    glossary = dict(next(s for s in build_report(tmp_path).sections if s.id == "summary").glossary)
    assert glossary["distinct_bigrams"] == (
        "the fraction of the samples' bigrams that occur once (diversity) (fraction; higher is better; the last "
        "evaluation's)"
    )


def test_the_catalogue_is_consistent() -> None:
    """Every metric a table shows or an entry refers to is an entry; names are unique; a second entry of a name is
    refused."""
    assert set(SUMMARY) <= set(METRICS) and set(TERMINAL) <= set(METRICS)
    for metric in METRICS.values():
        assert metric.se is None or METRICS[metric.se].source == metric.source
        assert metric.rate is False or metric.source == "step"
        assert metric.doc and metric.label and metric.fmt
    assert len(by_source("step")) == 16 and len(by_source("eval")) == 12
    assert set(METHOD_METRICS) <= set(METRICS)
    with pytest.raises(ValueError, match="metric 'loss' is in the catalogue already"):
        register(Metric("loss", "step", "loss", "nats", "lower", ".3f", "again"))
    with pytest.raises(ValueError, match="source 'batch'"):
        register(Metric("x", "batch", "x", "", None, ".1f", "x"))  # type: ignore[arg-type]
    assert glossary_table(["kl_to_reference"]).values.tolist()[0][:4] == ["kl_to_reference", "nats", "lower", "eval"]
    assert json.dumps(rankable()) == json.dumps(sorted(rankable()))


def test_per_prompt_values_of_the_last_evaluation(store: Store) -> None:
    """The evaluator's per-prompt list (``Metric.per_prompt``, gold_samples) is kept per evaluation; read_samples
    gives each cell's last evaluation's values in prompt order."""
    store.write_cell(cell("a", "dpo"), [], [{"step": 5, "gold_samples": [9.0, 9.0]},
                                            {"step": 10, "gold_reward": 0.2, "gold_samples": [0.1, 0.3]}])  # fmt: skip
    store.write_cell(cell("b", "ipo"), [], [{"step": 10, "gold_reward": 0.5}])  # none kept
    store.close()
    samples = read_samples(store.path)
    assert samples.values.tolist() == [["a", 0, 0.1], ["a", 1, 0.3]] and list(samples.columns) == [
        "cell_id", "prompt", "gold_reward"]  # fmt: skip
