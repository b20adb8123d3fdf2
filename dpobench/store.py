"""The results store: SQLite in the output directory, and the one module that speaks SQL.

Tables: ``runs`` (a command's settings, device and versions), ``cells`` (one trained configuration, or the reference
model: its ``role``), ``measurements`` (one row per cell × source × step × metric, the metric a name of the catalogue,
``dpobench.metrics``), ``prompt_values`` (a metric per evaluation prompt, where the catalogue says the evaluator
gives one) and ``step_costs`` (a run's side-by-side step times per configuration and round, ``dpobench.stepcost``). ``steps`` and ``evaluations`` are views with a column per metric, for reading with SQL.

A finished cell is written in one transaction, so an interrupted sweep loses nothing finished and a rerun of the
same command skips the cells already done. A store of schema 1 (a column per metric, and the reference cell known by
its label) is migrated when opened for writing, and read as it is when opened read-only.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from dpobench.metrics import METRICS, by_source

__all__ = ["ROLES", "SCHEMA_VERSION", "Store", "StoreError", "results_file"]

SCHEMA_VERSION = 2
#: a cell is a trained configuration ("variant") or the reference model every cell starts from
ROLES = ("variant", "reference")
#: how a schema-1 store named its reference cell (schema 2 records the role instead)
_SCHEMA_1_REFERENCE = "(reference)"

_CELL_COLUMNS = ("cell_id", "run_id", "variant", "role", "plugin", "plugin_version", "params", "beta", "seed",
                 "scenario", "model", "model_hash", "device", "dtype", "config", "status", "error", "started",
                 "finished", "seconds")  # fmt: skip

_TABLES = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, created REAL NOT NULL, command TEXT, config TEXT NOT NULL,
        dpobench_version TEXT, torch_version TEXT, transformers_version TEXT, git_commit TEXT,
        model TEXT, model_hash TEXT, data_hash TEXT, device TEXT, dtype TEXT, info TEXT
    )""",
    """CREATE TABLE cells (
        cell_id TEXT PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs(run_id), variant TEXT NOT NULL,
        plugin TEXT, plugin_version TEXT, params TEXT NOT NULL, beta REAL, seed INTEGER NOT NULL,
        scenario TEXT NOT NULL, model TEXT, model_hash TEXT, device TEXT, dtype TEXT, config TEXT NOT NULL,
        status TEXT NOT NULL, error TEXT, started REAL, finished REAL, seconds REAL,
        role TEXT NOT NULL DEFAULT 'variant'
    )""",
]
# Long rows, stored in key order (WITHOUT ROWID): a cell's values of one metric are read in step order
_LONG_TABLES = [
    """CREATE TABLE measurements (
        cell_id TEXT NOT NULL REFERENCES cells(cell_id), source TEXT NOT NULL, step INTEGER NOT NULL,
        metric TEXT NOT NULL, value REAL, PRIMARY KEY (cell_id, source, step, metric)
    ) WITHOUT ROWID""",
    """CREATE TABLE prompt_values (
        cell_id TEXT NOT NULL REFERENCES cells(cell_id), step INTEGER NOT NULL, metric TEXT NOT NULL,
        prompt INTEGER NOT NULL, value REAL, PRIMARY KEY (cell_id, step, metric, prompt)
    ) WITHOUT ROWID""",
]
# Each configuration's step time in each round of a run's side-by-side measurement (``dpobench.stepcost``); added to
# schema 2 by ``CREATE TABLE IF NOT EXISTS`` when a store is opened for writing (older stores read as having none)
_STEP_COSTS = """CREATE TABLE IF NOT EXISTS step_costs (
    run_id TEXT NOT NULL REFERENCES runs(run_id), variant TEXT NOT NULL, params TEXT NOT NULL, round INTEGER NOT NULL,
    step_time_ms REAL NOT NULL, PRIMARY KEY (run_id, variant, params, round)
) WITHOUT ROWID"""
_SOURCES = {"step": "steps", "eval": "evaluations"}  # a source's wide view (schema 1: its table)


class StoreError(RuntimeError):
    """The store cannot be used as it is, or was asked to keep what it cannot; the message says why."""


def results_file(store: str | Path) -> Path:
    """A store's SQLite file: ``store`` itself, or the ``results.sqlite`` of an output directory."""
    path = Path(store)
    return path / "results.sqlite" if path.is_dir() else path


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Store:
    """A results store. ``readonly``: read an existing store (``path`` may be its output directory) without
    changing it, even one of an older schema; otherwise open or create it for writing, migrating an older one."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.readonly = readonly
        if readonly:
            self.path = results_file(path)
            if not self.path.is_file():
                raise FileNotFoundError(
                    f"{self.path}: no results store; run `dpobench run --out {self.path.parent}` first"
                )
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, isolation_level=None)
        else:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA foreign_keys=ON")
        try:
            self.schema = self._open()
        except sqlite3.DatabaseError as error:  # not an SQLite file at all, or a damaged one
            self.db.close()
            raise StoreError(
                f"{self.path}: not a dpobench results store ({error}); use another --out directory"
            ) from None
        except BaseException:
            self.db.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    # -- opening, creating, migrating -----------------------------------------------------------------------------

    def _open(self) -> int:
        if self.readonly:
            return self._version(self._tables())
        with self._transaction():
            tables = self._tables()
            version = self._version(tables)
            if version == 0:
                for statement in [*_TABLES, *_LONG_TABLES]:
                    self.db.execute(statement)
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif version == 1:
                self._migrate_from_1(tables)
            self.db.execute(_STEP_COSTS)
            self._write_views()
        return SCHEMA_VERSION

    def _tables(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _version(self, tables: set[str]) -> int:
        """The schema of the file: 0 for an empty one; a file dpobench did not write, or a newer schema, is refused."""
        if not tables:
            if self.readonly:
                raise StoreError(f"{self.path}: an empty file, not a results store")
            return 0
        if "meta" not in tables:
            raise StoreError(f"{self.path}: an SQLite file that dpobench did not write; use another --out directory")
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row is not None else SCHEMA_VERSION
        if version not in (1, SCHEMA_VERSION):
            raise StoreError(
                f"{self.path}: written by another dpobench (schema {version}, this one reads {SCHEMA_VERSION}); "
                "use another --out directory"
            )
        return version

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate_from_1(self, tables: set[str]) -> None:
        """Schema 1 kept a column per metric (``steps``, ``evaluations``), the gold reward per prompt in ``samples``
        and no role: the same values become long rows, the reference cell its role. One transaction."""
        measured, per_prompt, _ = self._schema_1_selects(tables)
        for statement in _LONG_TABLES:
            self.db.execute(statement)
        self.db.execute(f"INSERT INTO measurements (cell_id, source, step, metric, value) {measured}")
        self.db.execute(f"INSERT INTO prompt_values (cell_id, step, metric, prompt, value) {per_prompt}")
        self.db.execute("ALTER TABLE cells ADD COLUMN role TEXT NOT NULL DEFAULT 'variant'")
        self.db.execute("UPDATE cells SET role = 'reference' WHERE variant = ?", (_SCHEMA_1_REFERENCE,))
        for table in ("samples", "evaluations", "steps"):
            self.db.execute(f"DROP TABLE IF EXISTS {table}")
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def _schema_1_selects(self, tables: set[str]) -> tuple[str, str, str]:
        """Schema 1's rows as schema 2 has them: measurements, prompt values and cells (with their role). The
        migration inserts the first two; a read-only store of schema 1 is read through all three."""
        parts = []
        for source, table in _SOURCES.items():
            if table not in tables:
                continue
            columns = [row[1] for row in self.db.execute(f"PRAGMA table_info({table})")]
            for column in columns:
                if column not in ("cell_id", "step"):
                    parts.append(f"SELECT cell_id, '{source}', step, '{column}', {_quote(column)} FROM {table} "
                                 f"WHERE {_quote(column)} IS NOT NULL")  # fmt: skip
        measured = " UNION ALL ".join(parts) or "SELECT NULL, NULL, NULL, NULL, NULL WHERE 0"
        if "samples" in tables:  # kept from the samples' introduction on: the gold reward per evaluation prompt
            per_prompt = "SELECT cell_id, step, 'gold_reward', prompt, gold_reward FROM samples"
        else:
            per_prompt = "SELECT NULL, NULL, NULL, NULL, NULL WHERE 0"
        role = f"CASE WHEN variant = '{_SCHEMA_1_REFERENCE}' THEN 'reference' ELSE 'variant' END AS role"
        cells = f"SELECT {', '.join(role if c == 'role' else c for c in _CELL_COLUMNS)} FROM cells ORDER BY rowid"
        return measured, per_prompt, cells

    def _write_views(self) -> None:
        """``steps`` and ``evaluations``: a column per catalogue metric of that source, for SQL readers. Rewritten
        when the catalogue changed since the store was last opened for writing."""
        existing = dict(self.db.execute("SELECT name, sql FROM sqlite_master WHERE type='view'").fetchall())
        for source, view in _SOURCES.items():
            columns = "".join(
                f", MAX(CASE WHEN metric = '{m}' THEN value END) AS {_quote(m)}" for m in by_source(source)
            )
            sql = (f"CREATE VIEW {view} AS SELECT cell_id, step{columns} FROM measurements WHERE source = '{source}' "
                   "GROUP BY cell_id, step")  # fmt: skip
            if existing.get(view) != sql:
                self.db.execute(f"DROP VIEW IF EXISTS {view}")
                self.db.execute(sql)

    # -- writing ----------------------------------------------------------------------------------------------------

    def add_run(self, run_id: str, **fields: Any) -> None:
        self._writable()
        with self._transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO runs (run_id, created, command, config, dpobench_version, torch_version, "
                "transformers_version, git_commit, model, model_hash, data_hash, device, dtype, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id, time.time(), fields.get("command"), json.dumps(fields.get("config", {}), sort_keys=True),
                    fields.get("dpobench_version"), fields.get("torch_version"), fields.get("transformers_version"),
                    fields.get("git_commit"), fields.get("model"), fields.get("model_hash"), fields.get("data_hash"),
                    fields.get("device"), fields.get("dtype"), json.dumps(fields.get("info", {}), sort_keys=True),
                ),
            )  # fmt: skip

    def finished(self, cell_id: str) -> bool:
        row = self.db.execute("SELECT status FROM cells WHERE cell_id=?", (cell_id,)).fetchone()
        return row is not None and row[0] in ("done", "diverged")

    def write_cell(
        self, cell: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], evaluations: Sequence[Mapping[str, Any]]
    ) -> None:
        """One transaction: the cell with all its steps and evaluations, or nothing. ``cell["role"]`` is "variant"
        (the default) or "reference". Each step and evaluation is ``{"step": n, metric: value, ...}`` with metrics of
        the catalogue of that source (an evaluation may add a metric's per-prompt list under its ``per_prompt`` key);
        anything else is refused with a ``StoreError`` before a row is written."""
        self._writable()
        cell_id = cell["cell_id"]
        row = {**cell, "role": cell.get("role", "variant")}
        if row["role"] not in ROLES:
            raise StoreError(f"cell {cell_id}: role {row['role']!r}; a cell is one of {', '.join(ROLES)}")
        unknown = set(row) - set(_CELL_COLUMNS)
        if unknown:
            raise StoreError(f"cell {cell_id}: no cell column {', '.join(map(repr, sorted(unknown)))}")
        values, prompts = [], []
        for source, records in (("step", steps), ("eval", evaluations)):
            for record in records:
                for metric, value, per_prompt in _measurements(cell_id, source, record):
                    if per_prompt:
                        prompts += [(cell_id, record["step"], metric, i, _real(v)) for i, v in enumerate(value)]
                    else:
                        values.append((cell_id, source, record["step"], metric, _real(value)))
        columns = list(row)
        with self._transaction():
            for table in ("measurements", "prompt_values"):
                self.db.execute(f"DELETE FROM {table} WHERE cell_id=?", (cell_id,))
            self.db.execute(
                f"INSERT OR REPLACE INTO cells ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [row[c] for c in columns],
            )
            self.db.executemany(
                "INSERT INTO measurements (cell_id, source, step, metric, value) VALUES (?, ?, ?, ?, ?)", values
            )
            self.db.executemany(
                "INSERT INTO prompt_values (cell_id, step, metric, prompt, value) VALUES (?, ?, ?, ?, ?)", prompts
            )

    def write_step_costs(self, run_id: str, times: Sequence[Mapping[str, Any]]) -> None:
        """A run's side-by-side step-cost measurement, one transaction: ``variant``, ``params`` (JSON, no β),
        ``round``, ``step_time_ms`` per row; a measurement repeated for the run replaces the earlier one."""
        self._writable()
        rows = [(run_id, t["variant"], t["params"], int(t["round"]), float(t["step_time_ms"])) for t in times]
        with self._transaction():
            self.db.execute("DELETE FROM step_costs WHERE run_id=?", (run_id,))
            self.db.executemany("INSERT INTO step_costs VALUES (?, ?, ?, ?, ?)", rows)

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")

    # -- reading ----------------------------------------------------------------------------------------------------

    def cells(self) -> pd.DataFrame:
        """Every cell in the order written, with its ``role``."""
        if self.schema == 1:
            query = self._schema_1_selects(self._tables())[2]
        else:
            query = f"SELECT {', '.join(_CELL_COLUMNS)} FROM cells ORDER BY rowid"
        return pd.read_sql_query(query, self.db)

    def runs(self) -> pd.DataFrame:
        """Every run, oldest first; ``config`` and ``info`` as JSON text."""
        return pd.read_sql_query("SELECT * FROM runs ORDER BY created", self.db)

    def measurements(self) -> pd.DataFrame:
        """One row per cell × source × step × metric, each cell's values of a metric in step order."""
        frame = pd.read_sql_query(
            f"WITH m (cell_id, source, step, metric, value) AS ({self._measured()}) "
            "SELECT * FROM m ORDER BY cell_id, source, step, metric",
            self.db,
        )
        return frame.astype({"step": "int64", "value": "float64"})  # NULL (NaN when measured) reads as NaN

    def _measured(self) -> str:
        if self.schema == 1:
            return self._schema_1_selects(self._tables())[0]
        return "SELECT cell_id, source, step, metric, value FROM measurements"

    def prompt_values(self, metric: str) -> pd.DataFrame:
        """``metric`` per evaluation prompt at each cell's last evaluation: ``cell_id``, ``prompt``, ``value``, in
        the prompts' order. Empty where the evaluations kept none (cells without a gold reward, older stores)."""
        if self.schema == 1:
            per_prompt = self._schema_1_selects(self._tables())[1]
        else:
            per_prompt = "SELECT cell_id, step, metric, prompt, value FROM prompt_values"
        frame = pd.read_sql_query(
            f"WITH m (cell_id, source, step, metric, value) AS ({self._measured()}), "
            f"p (cell_id, step, metric, prompt, value) AS ({per_prompt}) "
            "SELECT p.cell_id, p.prompt, p.value FROM p JOIN (SELECT cell_id, MAX(step) AS step FROM m "
            "WHERE source = 'eval' GROUP BY cell_id) last ON p.cell_id = last.cell_id AND p.step = last.step "
            "WHERE p.metric = ? ORDER BY p.cell_id, p.prompt",
            self.db,
            params=(metric,),
        )
        return frame.astype({"prompt": "int64", "value": "float64"})

    def step_costs(self) -> pd.DataFrame:
        """Every run's side-by-side step times: ``run_id``, ``variant``, ``params``, ``round``, ``step_time_ms``, with
        the run's ``created`` time (empty for a store that has none)."""
        if "step_costs" not in self._tables():
            return pd.DataFrame(columns=["run_id", "variant", "params", "round", "step_time_ms", "created"])
        return pd.read_sql_query(
            "SELECT s.*, r.created FROM step_costs s JOIN runs r USING (run_id) ORDER BY r.created, s.variant, "
            "s.params, s.round",
            self.db,
        )

    def frame(self, table: str) -> pd.DataFrame:
        """A table as it is: ``runs``, ``cells``, or the wide views ``steps`` and ``evaluations``."""
        if table == "cells":
            return self.cells()
        if table not in ("runs", *_SOURCES.values()):
            raise StoreError(f"no table {table!r}; read runs, cells, steps or evaluations")
        frame = pd.read_sql_query(f"SELECT * FROM {table}", self.db)
        metrics = [c for c in frame.columns if c not in ("cell_id", "step", "run_id")] if table != "runs" else []
        return frame.astype({m: "float64" for m in metrics})  # an all-NULL metric reads as NaN, not None


def _measurements(cell_id: str, source: str, record: Mapping[str, Any]) -> Iterator[tuple[str, Any, bool]]:
    """``(metric, value, is_per_prompt)`` of one step's or evaluation's record; a key that is not a catalogue metric
    of this source is refused (a store that dropped it silently would lose a measurement)."""
    what = "training step" if source == "step" else "evaluation"
    if "step" not in record:
        raise StoreError(f"cell {cell_id}: {'a' if source == 'step' else 'an'} {what} without its step number")
    per_prompt = {m.per_prompt: m.name for m in METRICS.values() if m.per_prompt and m.source == source}
    for key, value in record.items():
        if key == "step":
            continue
        if key in per_prompt:
            yield per_prompt[key], value, True
            continue
        metric = METRICS.get(key)
        if metric is None:
            raise StoreError(
                f"cell {cell_id}: {what} {record['step']} has {key!r}, which is not in the metric catalogue "
                "(dpobench.metrics); add a Metric for it there"
            )
        if metric.source != source:
            raise StoreError(
                f"cell {cell_id}: {key!r} is measured at each {'evaluation' if metric.source == 'eval' else 'training step'}"
                f", but came with {what} {record['step']}"
            )
        yield key, value, False


def _real(value: Any) -> float | None:
    """A value as SQLite keeps it: a float, or NULL for None and NaN."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number
