"""The results store: SQLite in the output directory (runs, cells, steps, evaluations, and the evaluations'
per-prompt gold rewards, ``samples``).

A finished cell is written in one transaction, so an interrupted sweep loses nothing finished and a
rerun of the same command skips the cells already done.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["EVAL_METRICS", "SCHEMA_VERSION", "STEP_METRICS", "Store"]

SCHEMA_VERSION = 1
STEP_METRICS = [
    "loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
    "grad_norm", "step_time_ms", "pairs_per_s", "tokens_per_s", "peak_memory_mb",
]  # fmt: skip
EVAL_METRICS = [
    "gold_reward", "gold_reward_se", "kl_to_reference", "response_length", "grammatical_fraction",
    "heldout_reward_accuracy", "heldout_reward_margin", "n_samples",
]  # fmt: skip

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, created REAL NOT NULL, command TEXT, config TEXT NOT NULL,
    dpobench_version TEXT, torch_version TEXT, transformers_version TEXT, git_commit TEXT,
    model TEXT, model_hash TEXT, data_hash TEXT, device TEXT, dtype TEXT, info TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs(run_id), variant TEXT NOT NULL,
    plugin TEXT, plugin_version TEXT, params TEXT NOT NULL, beta REAL, seed INTEGER NOT NULL,
    scenario TEXT NOT NULL, model TEXT, model_hash TEXT, device TEXT, dtype TEXT, config TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT, started REAL, finished REAL, seconds REAL
);
CREATE TABLE IF NOT EXISTS steps (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id), step INTEGER NOT NULL,
    {", ".join(f"{m} REAL" for m in STEP_METRICS)}, PRIMARY KEY (cell_id, step)
);
CREATE TABLE IF NOT EXISTS evaluations (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id), step INTEGER NOT NULL,
    {", ".join(f"{m} REAL" for m in EVAL_METRICS)}, PRIMARY KEY (cell_id, step)
);
CREATE TABLE IF NOT EXISTS samples (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id), step INTEGER NOT NULL, prompt INTEGER NOT NULL,
    gold_reward REAL, PRIMARY KEY (cell_id, step, prompt)
);
"""


class StoreError(RuntimeError):
    """The store cannot be used as it is; the message says why and what to do."""


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute("PRAGMA foreign_keys=ON")
        tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            self.db.close()
            raise StoreError(f"{self.path}: an SQLite file that dpobench did not write; use another --out directory")
        with self.db:
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        if row is not None and int(row[0]) != SCHEMA_VERSION:
            self.db.close()
            raise StoreError(
                f"{self.path}: written by another dpobench (schema {row[0]}, this one reads {SCHEMA_VERSION}); "
                "use another --out directory"
            )

    def close(self) -> None:
        self.db.close()

    def add_run(self, run_id: str, **fields: Any) -> None:
        with self.db:
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
        self, cell: dict[str, Any], steps: list[dict[str, float]], evaluations: list[dict[str, float]]
    ) -> None:
        """One transaction: the cell with all its steps and evaluations, or nothing."""
        columns = list(cell)
        with self.db:
            self.db.execute("DELETE FROM steps WHERE cell_id=?", (cell["cell_id"],))
            self.db.execute("DELETE FROM evaluations WHERE cell_id=?", (cell["cell_id"],))
            self.db.execute("DELETE FROM samples WHERE cell_id=?", (cell["cell_id"],))
            self.db.execute(
                f"INSERT OR REPLACE INTO cells ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [cell[c] for c in columns],
            )
            self.db.executemany(
                f"INSERT INTO steps (cell_id, step, {', '.join(STEP_METRICS)}) VALUES ({', '.join('?' * (len(STEP_METRICS) + 2))})",
                [(cell["cell_id"], s["step"], *(s.get(m) for m in STEP_METRICS)) for s in steps],
            )
            self.db.executemany(
                f"INSERT INTO evaluations (cell_id, step, {', '.join(EVAL_METRICS)}) VALUES ({', '.join('?' * (len(EVAL_METRICS) + 2))})",
                [(cell["cell_id"], e["step"], *(e.get(m) for m in EVAL_METRICS)) for e in evaluations],
            )
            self.db.executemany(  # each evaluation's per-prompt gold rewards, where the task has them
                "INSERT INTO samples (cell_id, step, prompt, gold_reward) VALUES (?, ?, ?, ?)",
                [
                    (cell["cell_id"], e["step"], i, g)
                    for e in evaluations
                    for i, g in enumerate(e.get("gold_samples") or [])
                ],
            )

    def frame(self, table: str) -> pd.DataFrame:
        frame = pd.read_sql_query(f"SELECT * FROM {table}", self.db)
        metrics = {"steps": STEP_METRICS, "evaluations": EVAL_METRICS}.get(table, [])
        return frame.astype({m: "float64" for m in metrics})  # an all-NULL metric reads as NaN, not None
