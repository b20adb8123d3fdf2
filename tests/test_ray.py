"""The Ray executor: each cell a Ray task, the driver the store's only writer.

Every run here is a real `dpobench run --executor ray` with a real local Ray, inside a network namespace the test
makes (`unshare --net`, only `lo` up): Ray registers its node at the machine's external address even when told
127.0.0.1, and inside the namespace there is no other address to listen on.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dpobench.metrics import TIMINGS

from .conftest import BROKEN_PLUGINS, subprocess_env
from .test_reliability import wait_for_cells


def _namespace_ok() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (dpobench[ray])"),
    pytest.mark.skipif(not _namespace_ok(), reason="cannot make a network namespace: Ray must stay on loopback"),
]

RAY_PLUGINS = Path(__file__).parent / "ray_plugins"
#: the metrics that time the cell: the only ones that may differ between two runs of the same cell


def dpobench(*args: str, ray: bool) -> list[str]:
    """The command line of `python -m dpobench ARGS`; with ``ray``, run inside a new network namespace."""
    command = [sys.executable, "-m", "dpobench", *args]
    if not ray:
        return command
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command, "--executor", "ray"]


def run(*args: str, ray: bool, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(dpobench(*args, ray=ray), capture_output=True, text=True, timeout=300,
                          env=subprocess_env(**env))  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs written from the task's grammar (a review's opening; a warm and a cold next sentence), read by each
    sweep instead of sampling pairs from the model (seconds a run)."""
    from dpobench.task import _sentence, sample_review

    rng, rows = random.Random(0), []
    while len(rows) < 96:
        prompt, chosen, rejected = sample_review(rng).prompt, _sentence(rng, 1.0) + " .", _sentence(rng, -1.0) + " ."
        if chosen != rejected:
            rows.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def model(untrained_model: Path, pairs: Path) -> list[str]:
    return ["--model", str(untrained_model), "--data", str(pairs)]


def sweep_args(model: list[str], out: Path, variants: str, *extra: str, plugins: tuple[Path, ...] = ()) -> list[str]:
    # no step-cost measurement after the cells (it runs in the driver, whatever the executor): slow_dpo's 0.6 s × 9
    return ["--plugins-dir", str(RAY_PLUGINS), *(f"--plugins-dir={p}" for p in plugins), "run", *model,
            "--variants", variants, "--steps", "6", "--batch-size", "8", "--out", str(out), "--no-report",
            "--step-cost-rounds", "0", *extra]  # fmt: skip


def store_content(path: Path) -> tuple[dict, list, list]:
    """Every cell's identity and outcome, every measurement but the timings, every per-prompt value."""
    with sqlite3.connect(path) as db:
        cells = {row[0]: row[1:] for row in db.execute("SELECT cell_id, variant, status, error FROM cells")}
        measured = db.execute("SELECT cell_id, step, metric, value FROM measurements ORDER BY cell_id, step, metric")
        values = db.execute("SELECT * FROM prompt_values ORDER BY 1, 2, 3").fetchall()
        return cells, [row for row in measured if row[2] not in TIMINGS], values


def commit_order(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT variant FROM cells WHERE role = 'variant' ORDER BY rowid")]


def on_a_running_cluster(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`ray start --head` in a network namespace, then `dpobench ARGS --executor ray --ray-address` to it; prints
    CLUSTER-STILL-UP where the cluster outlived the sweep (the driver stops only a Ray it started)."""
    ray = Path(sys.executable).parent / "ray"
    command = shlex.join(dpobench(*args, ray=False))
    script = (
        f"ip link set lo up && {ray} start --head --node-ip-address 127.0.0.1 --port 6390 --num-cpus 2 "
        "--include-dashboard false --disable-usage-stats >/dev/null 2>&1 && "
        f"{command} --executor ray --ray-address 127.0.0.1:6390; status=$?; "
        f"{ray} status --address 127.0.0.1:6390 >/dev/null 2>&1 && echo CLUSTER-STILL-UP; "
        f"{ray} stop --force >/dev/null 2>&1; exit $status"
    )
    # RAY_AUTH_MODE=token: the driver presents the token `ray start` wrote (Ray's default for a cluster it joins)
    return subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(RAY_AUTH_MODE="token"))  # fmt: skip


def test_ray_cells_equal_in_process_cells_whatever_order_they_finish_in(tmp_path: Path, model: list[str]) -> None:
    """Two workers of one thread: the slow cell, submitted first, is committed last; the store holds the same cells
    with the same numbers, bit for bit, as the in-process sweep one cell at a time on one thread; a rerun trains
    nothing."""
    variants = "slow_dpo,dpo,ipo"
    here = run(*sweep_args(model, tmp_path / "here", variants, "--parallel-cells", "1"), ray=False, OMP_NUM_THREADS="1")
    assert here.returncode == 0, here.stderr
    on_ray = run(*sweep_args(model, tmp_path / "ray", variants, "--threads-per-cell", "1"), ray=True)
    assert on_ray.returncode == 0, on_ray.stderr

    assert store_content(tmp_path / "ray" / "results.sqlite") == store_content(tmp_path / "here" / "results.sqlite")
    assert commit_order(tmp_path / "here" / "results.sqlite") == ["slow_dpo", "dpo", "ipo"]
    assert commit_order(tmp_path / "ray" / "results.sqlite")[-1] == "slow_dpo"  # submitted first, committed last
    summaries = [pd.read_csv(tmp_path / out / "summary.csv").drop(columns=[*TIMINGS, "run_id"])
                 for out in ("here", "ray")]  # fmt: skip
    pd.testing.assert_frame_equal(summaries[0], summaries[1])

    again = run(*sweep_args(model, tmp_path / "ray", variants, "--threads-per-cell", "1"), ray=True)
    assert again.returncode == 0, again.stderr
    assert "3 cells, 3 already in the store, 0 to run" in again.stderr
    assert store_content(tmp_path / "ray" / "results.sqlite") == store_content(tmp_path / "here" / "results.sqlite")


def test_a_raising_cell_and_a_dying_worker_fail_alone(tmp_path: Path, model: list[str]) -> None:
    """A loss that raises fails its cell with the reason; a worker killed once is retried and its cell finishes; a
    worker killed on every attempt is retried once, then its cell is recorded as failed; the others finish."""
    markers = tmp_path / "markers"
    markers.mkdir()
    out = tmp_path / "out"
    args = sweep_args(
        model, out, "always_dies,raising_loss,dies_once,dpo", plugins=(BROKEN_PLUGINS / "raising_loss.py",)
    )
    result = run(*args, ray=True, DPOBENCH_TEST_MARKERS=str(markers))
    assert result.returncode == 1, result.stderr  # some cells failed
    with sqlite3.connect(out / "results.sqlite") as db:
        cells = {v: (s, e) for v, s, e in db.execute("SELECT variant, status, error FROM cells WHERE role = 'variant'")}
        steps = dict(db.execute("SELECT c.variant, COUNT(*) FROM steps s JOIN cells c USING (cell_id) GROUP BY 1"))
    assert cells["dpo"] == ("done", "") and cells["dies_once"] == ("done", "") and steps["dies_once"] == 6
    assert cells["raising_loss"][0] == "failed" and "this loss is broken on purpose" in cells["raising_loss"][1]
    assert cells["always_dies"][0] == "failed"
    assert cells["always_dies"][1].startswith("the Ray worker running it died, and again when Ray retried it")
    assert len((markers / "always_dies").read_text().split()) == 2  # the first attempt and Ray's one retry
    assert (markers / "dies_once").exists()  # it did die once
    assert "failed: [1/4] always_dies" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_cancels_the_cells_in_flight_keeps_the_committed_and_the_rerun_finishes(
    tmp_path: Path, model: list[str]
) -> None:
    """Ctrl-C on the driver of a local Ray: whole cells kept, the resume command printed. The rerun joins a running
    cluster instead (`ray start --head`, `--ray-address`): the same cells, so it runs exactly the rest."""
    out = tmp_path / "out"
    args = sweep_args(model, out, "dpo,ipo,simpo,cpo,orpo,rpo", "--steps", "30")
    process = subprocess.Popen(dpobench(*args, ray=True), env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_cells(out / "results.sqlite", 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopping: cancelling the" in stderr and "cells in flight; finished cells are kept" in stderr
    assert "interrupted: finished cells are in the store; rerun the same command to resume" in stderr
    assert shlex.join(["dpobench", *args, "--executor", "ray"]) in stderr and "Traceback" not in stderr
    with sqlite3.connect(out / "results.sqlite") as db:
        kept = db.execute("SELECT COUNT(*) FROM cells WHERE role = 'variant'").fetchone()[0]
        statuses = {row[0] for row in db.execute("SELECT status FROM cells")}
        per_cell = {n for (n,) in db.execute("SELECT COUNT(*) FROM steps GROUP BY cell_id")}
    assert 1 <= kept < 6 and statuses == {"done"} and per_cell == {30}  # no half-trained or cancelled cell

    again = on_a_running_cluster(args)
    assert again.returncode == 0, again.stderr
    assert f"6 cells, {kept} already in the store, {6 - kept} to run" in again.stderr
    assert "CLUSTER-STILL-UP" in again.stdout
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM cells WHERE role = 'variant' AND status = 'done'").fetchone()[0] == 6


def test_a_cell_no_node_can_hold_is_refused_not_left_waiting(tmp_path: Path, model: list[str]) -> None:
    """A task asking for more CPUs than any node has would wait in Ray's queue forever, without a word."""
    result = run(*sweep_args(model, tmp_path / "out", "dpo", "--threads-per-cell", "64"), ray=True)
    assert result.returncode == 2, result.stderr
    assert "error: --threads-per-cell 64: each cell asks Ray for 64 CPUs, and no node of the Ray cluster has that" in (
        " ".join(result.stderr.split())
    )
    assert "Traceback" not in result.stderr


def test_ray_options_need_the_ray_executor(tmp_path: Path) -> None:
    from dpobench.config import SweepError, check_executor, load_config

    with pytest.raises(SweepError, match=r"--ray-address \(or ray_address in a config file\) needs --executor ray"):
        check_executor(load_config({"ray_address": "auto"}).executor)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # a port nothing listens on: refused at once, where Ray would retry for minutes
    with pytest.raises(SweepError, match=rf"--ray-address 127.0.0.1:{port}: nothing answers there \(Connection "
                       r"refused\); start the cluster with `ray start --head`"):  # fmt: skip
        check_executor(load_config({"executor": "ray", "ray_address": f"127.0.0.1:{port}"}).executor)
    with pytest.raises(SweepError, match=r"--ray-address 'head-node': write HOST:PORT"):
        check_executor(load_config({"executor": "ray", "ray_address": "head-node"}).executor)
    with pytest.raises(SweepError, match=r"executor = 'dask': use one of process, ray"):
        load_config({"executor": "dask"})
    assert load_config({"executor": "ray", "threads_per_cell": 2}).executor.threads_per_cell == 2
