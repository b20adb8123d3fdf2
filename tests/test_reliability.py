"""Reliability: broken plugins contained, bad input refused in one line with nothing claimed, interruptions
(Ctrl-C, SIGKILL) lose no finished cell, caches and stores that cannot be trusted are rebuilt or refused."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpobench.data import DataError, load_pairs_file
from dpobench.logprobs import cached_reference_logprobs
from dpobench.models import SFTRecipe, reference_model
from dpobench.store import Store, StoreError
from dpobench.task import build_tokenizer

from .conftest import BROKEN_PLUGINS, dpobench_main, subprocess_env


def dpobench_run(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dpobench", *args], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=timeout)  # fmt: skip


def claims_nothing(out: Path) -> bool:
    """No store row and no report claims a result."""
    if (out / "report.html").exists() or (out / "summary.csv").exists():
        return False
    if not (out / "results.sqlite").exists():
        return True
    with sqlite3.connect(out / "results.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM cells WHERE status = 'done'").fetchone()[0] == 0


def test_broken_plugins_fail_their_cells_and_the_sweep_goes_on(tmp_path: Path, untrained_model: Path) -> None:
    out = tmp_path / "out"
    result = dpobench_run(
        "--plugins-dir", str(BROKEN_PLUGINS), "run", "--model", str(untrained_model), "--steps", "3",
        "--variants", "dpo,raising_loss,nan_loss,wrong_shape,backward_raises,squared_hinge", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # a failed cell makes the command fail, at the end
    summary = pd.read_csv(out / "summary.csv").set_index("variant")
    assert summary.loc["dpo", "status"] == summary.loc["squared_hinge", "status"] == "done"
    assert summary.loc["raising_loss", "status"] == "failed"
    assert summary.loc["raising_loss", "error"] == "step 1: RuntimeError: this loss is broken on purpose"
    assert summary.loc["nan_loss", "status"] == "diverged"
    assert summary.loc["nan_loss", "error"] == "step 1: the loss is nan"
    assert summary.loc["wrong_shape", "status"] == "failed"
    assert "the loss returned losses of shape () for 32 pairs; expected (32,)" in summary.loc["wrong_shape", "error"]
    assert summary.loc["backward_raises", "status"] == "failed"  # its backward pass raised: the sweep went on
    assert summary.loc["backward_raises", "error"].startswith(
        "step 1: backward: RuntimeError: one of the variables needed for gradient computation has been modified"
    )
    html = (out / "report.html").read_text()
    assert "Failed and diverged cells" in html and "this loss is broken on purpose" in html
    assert "plugin error: plugin 'misspelled_hook'" in result.stderr  # import-time failures are named too, and the
    assert "plugins failed to load (the error above): their variants did not run" in " ".join(result.stderr.split())
    terminal = " ".join(result.stderr.split())  # the terminal says why a cell failed, not only that it did
    assert (
        "failed: [" in terminal
        and "raising_loss β=0.1 seed=0 clean: step 1: RuntimeError: this loss is broken on purpose" in terminal
    )
    assert "diverged: [" in terminal and "nan_loss β=0.1 seed=0 clean: step 1: the loss is nan" in terminal
    table = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines() if line.strip()}
    assert table["nan_loss"] == "diverged" and table["raising_loss"] == "failed" and table["dpo"] == "ok"
    with sqlite3.connect(out / "results.sqlite") as db:
        steps = dict(
            db.execute("SELECT variant, COUNT(step) FROM cells LEFT JOIN steps USING (cell_id) GROUP BY variant")
        )
    assert steps["dpo"] == 3 and steps["raising_loss"] == 0


def write_jsonl(path: Path, rows: list) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))  # "\udce9": the byte 0xe9, not UTF-8
    return path


GOOD = {"prompt": "the movie was great .", "chosen": "i loved the plot .", "rejected": "i hated the plot ."}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([GOOD, "{not json"], "pairs.jsonl:line 2: not valid JSON"),
        (
            [GOOD, {"prompt": "p", "chosen": "c"}],
            "pairs.jsonl:line 2: missing key 'rejected'; each row needs prompt, chosen and rejected",
        ),
        ([GOOD, {**GOOD, "chosen": "  "}], "pairs.jsonl:line 2: 'chosen' must be a non-empty string"),
        ([GOOD, {**GOOD, "rejected": 3}], "pairs.jsonl:line 2: 'rejected' must be a non-empty string"),
        ([GOOD, {**GOOD, "rejected": GOOD["chosen"]}], "pairs.jsonl:line 2: chosen and rejected are identical"),
        ([GOOD, {**GOOD, "weight": "heavy"}], "pairs.jsonl:line 2: weight 'heavy' is not a number"),
        ([GOOD, {**GOOD, "weight": float("nan")}], "pairs.jsonl:line 2: weight nan must be a finite number ≥ 0"),
        ([GOOD, {**GOOD, "weight": -1}], "pairs.jsonl:line 2: weight -1.0 must be a finite number ≥ 0"),
        (
            [json.dumps(GOOD), json.dumps(GOOD).replace("great", "gr\udce9at")],
            "pairs.jsonl:line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8",
        ),
        (
            [GOOD, {"prompt": "Paris is the capital of", "chosen": "France.", "rejected": "Spain, surely."}],
            "pairs.jsonl: 21% of its tokens are unknown to the model's tokenizer (75 entries); pass --model",
        ),
    ],
)
def test_bad_data_is_refused_with_the_file_the_row_and_what_is_wrong(tmp_path: Path, rows: list, message: str) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_pairs_file(data, build_tokenizer(), max_length=64)  # the untrained model's tokenizer
    assert str(error.value).startswith(str(data)) and message in str(error.value), error.value


def test_bad_data_from_the_cli_is_one_line_and_claims_nothing(tmp_path: Path, untrained_model: Path) -> None:
    """The whole path once: the data error reaches the user as one line, exit code 2, and no --out folder."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "weight": -1}])
    out = tmp_path / "out"
    result = dpobench_main(
        "run", "--model", str(untrained_model), "--data", str(data), "--variants", "dpo", "--out", str(out)
    )
    assert result.returncode == 2 and "pairs.jsonl:line 2: weight -1.0 must be a finite number ≥ 0" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert claims_nothing(out) and not out.exists()  # not even an empty --out folder is left behind


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark: the header's first key was read as '\ufeffprompt', and the
    file refused with "missing key 'prompt'"; a JSONL with one failed as invalid JSON."""
    from dpobench.data import _read_rows

    csv_file = tmp_path / "pairs.csv"
    csv_file.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\r\nthe movie,i loved it,i hated it\r\n")
    assert _read_rows(csv_file) == [
        ("row 2", {"prompt": "the movie", "chosen": "i loved it", "rejected": "i hated it"})
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert _read_rows(jsonl) == [("line 1", GOOD)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variants", "dpo,simpo_tlr"], "error: unknown loss variant 'simpo_tlr'; did you mean 'simpo_trl'?"),
        (["--betas", "0.1,0"], "error: β = 0.0: every β must be > 0"),
        (["--seeds", "-1"], "error: seed -1: seeds must be ≥ 0"),
        (["--lr", "0"], "error: lr = 0: must be > 0"),
        (
            ["--variants", "cdpo", "--param", "cdpo.label_smoothing=0.7"],
            "parameter label_smoothing='0.7' is outside its valid range [0, 0.5)",
        ),
        (["--device", "cuda"], "error: --device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto"),
        (["--out", "/proc/dpobench-out"], "is not writable"),
        (["--model", "/no/such/model"], "error: --model '/no/such/model': no such folder"),
        (["--model", "tinyy"], "error: --model 'tinyy': did you mean 'tiny'?"),
        (
            ["--model", "NO_TOKENIZER"],
            "the folder has no tokenizer (tokenizer.json, tokenizer_config.json, …); save it",
        ),
        (["--variants", ""], "error: variants = '': names no variant; leave it out to run every variant"),
        (
            ["--variants", "dpo,ipo", "--param", "ipp.beta=0.5"],
            "'ipp' is not among the variants of this sweep; did you mean 'ipo'?",
        ),
        (
            ["--data", "PAIRS", "--labels", "bt"],
            "error: --labels bt: labels the synthetic task's pairs; drop it with --data",
        ),
        (
            ["--data", "PAIRS", "--eval-prompts", "8"],
            "error: --eval-prompts 8: sizes the pairs dpobench samples (the synthetic task's, or a judge's); --data's",
        ),
    ],
)
def test_bad_settings_are_one_line_and_claim_nothing(
    tmp_path: Path, untrained_model: Path, args: list, message: str
) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    args = [str(write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD | {"chosen": "i liked it ."}])) if a == "PAIRS" else a
            for a in args]  # fmt: skip
    if "NO_TOKENIZER" in args:  # the model's weights and config alone
        bare = tmp_path / "bare"
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            (bare / name).write_bytes((untrained_model / name).read_bytes())
        args = [str(bare) if a == "NO_TOKENIZER" else a for a in args]
    result = dpobench_main("run", "--model", str(untrained_model), "--steps", "2", "--out", str(out), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert claims_nothing(out) and not out.exists()


def test_a_missing_data_file_or_unusable_store_is_refused_before_the_model_is_built(tmp_path: Path) -> None:
    """With a cold cache the default model takes its SFT training first; these errors must not wait for it."""
    other = tmp_path / "other"
    other.mkdir()
    with sqlite3.connect(other / "results.sqlite") as db:
        db.execute("CREATE TABLE customers (id INTEGER)")
    cache = tmp_path / "cache"
    cases = [(["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out")], "nope.jsonl: no such file"),
             (["--out", str(other)], "an SQLite file that dpobench did not write")]  # fmt: skip
    for args, message in cases:
        result = dpobench_main("run", "--variants", "dpo", *args, DPOBENCH_CACHE=str(cache))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not any(cache.rglob("*.safetensors")), args  # no model was built


def test_debug_shows_the_traceback(tmp_path: Path, untrained_model: Path) -> None:
    result = dpobench_run(
        "--debug", "run", "--model", str(untrained_model), "--variants", "dpoo", "--out", str(tmp_path)
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_pair_longer_than_the_context_is_truncated_and_counted(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    long = " ".join(["the movie was great ."] * 40)  # 200 words
    data = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "chosen": long}, GOOD])
    task = load_pairs_file(data, tokenizer, max_length=64, heldout_fraction=0.34)
    pairs = task.train.pairs + task.heldout.pairs
    assert task.info["truncated"] == 1
    longest = max(pairs, key=lambda p: len(p.chosen))
    # Rule: keep the prompt and the start of each completion, keep EOS, fit max_length.
    assert len(longest.prompt) + len(longest.chosen) == 64 and longest.chosen[-1] == tokenizer.eos_token_id
    # its short rejected completion is left as it was: one EOS (cutting it too repeated its EOS)
    eos = tokenizer.eos_token_id
    assert longest.rejected == (*tokenizer(GOOD["rejected"], add_special_tokens=False).input_ids, eos)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(DataError, match=r"pairs.txt: unknown format '.txt'; use .jsonl, .csv or .parquet"):
        load_pairs_file(tmp_path / "pairs.txt", tokenizer, 64)
    with pytest.raises(DataError, match="no such file"):
        load_pairs_file(tmp_path / "nope.jsonl", tokenizer, 64)


def test_store_from_another_version_or_program_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "a.sqlite").close()
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    from dpobench.store import SCHEMA_VERSION

    with pytest.raises(
        StoreError, match=rf"written by another dpobench \(schema 99, this one reads {SCHEMA_VERSION}\)"
    ):
        Store(tmp_path / "a.sqlite")
    with sqlite3.connect(tmp_path / "b.sqlite") as db:
        db.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(StoreError, match="an SQLite file that dpobench did not write"):
        Store(tmp_path / "b.sqlite")
    with sqlite3.connect(tmp_path / "b.sqlite") as db:  # and it was not modified
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["customers"]


def test_corrupted_caches_are_rebuilt_not_trusted(tmp_path: Path, untrained_model: Path) -> None:
    recipe = SFTRecipe(size="tiny", steps=5, corpus=200)
    folder = reference_model(recipe)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    messages: list[str] = []
    assert reference_model(recipe, progress=messages.append) == folder
    assert any("corrupted; rebuilding" in m for m in messages)
    assert (folder / "model.safetensors").read_bytes() == weights  # deterministic rebuild: the same model

    from dpobench.data import Pair
    from dpobench.models import load_model

    model, _tokenizer = load_model(untrained_model)
    pairs = [Pair((1, 5), (6, 2), (7, 2))] * 3
    first = cached_reference_logprobs(model, pairs, 0, "k", tmp_path, device="cpu", autocast=False)
    (cache_file,) = (tmp_path / "reference").glob("*.safetensors")
    cache_file.write_bytes(b"garbage")
    again = cached_reference_logprobs(model, pairs, 0, "k", tmp_path, device="cpu", autocast=False)
    assert torch.equal(first.chosen, again.chosen) and torch.equal(first.rejected, again.rejected)
    # per token: a separate entry, whose rows add up to the sums
    tokens = cached_reference_logprobs(model, pairs, 0, "k", tmp_path, device="cpu", autocast=False, token_logps=True)
    assert len(list((tmp_path / "reference").glob("*.safetensors"))) == 2
    torch.testing.assert_close(tokens.chosen_token_logps.sum(1), first.chosen)
    torch.testing.assert_close(tokens.rejected_token_logps.sum(1), first.rejected)
    assert tokens.chosen_token_logps.shape == (3, 2) and first.chosen_token_logps is None


def wait_for_cells(db_path: Path, count: int, timeout: float = 240) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if db_path.exists():
            try:
                with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as db:
                    if db.execute("SELECT COUNT(*) FROM cells WHERE variant != '(reference)'").fetchone()[0] >= count:
                        return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} cells finished in {timeout} s")


VARIANTS = "dpo,ipo,hinge,simpo,cpo,nca_pair,bco_pair,apo_zero"


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()  # after the command name, which may hold spaces
            if int(fields[1]) == pid:
                found.add(int(stat.parent.name))
    return found


def wait_until_gone(pids: set[int], timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.1)
    return False


def test_sigkill_mid_sweep_then_rerun_finishes_each_cell_once(tmp_path: Path, untrained_model: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dpobench", "run", "--model", str(untrained_model), "--variants", VARIANTS,
               "--steps", "25", "--out", str(out), "--no-report", "--parallel-cells", "2"]  # fmt: skip
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_cells(out / "results.sqlite", 2)
        time.sleep(0.3)  # somewhere inside the next cell
        workers = children(process.pid)  # the cells training side by side
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert workers and wait_until_gone(workers), "the side-by-side workers outlived their killed driver"
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        before = dict(db.execute("SELECT cell_id, finished FROM cells"))
    assert 2 <= len(before) - 1 < 8
    rerun = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"8 cells, {len(before) - 1} already in the store, {9 - len(before)} to run" in " ".join(
        rerun.stderr.split()
    )
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = dict(db.execute("SELECT variant, COUNT(*) FROM cells GROUP BY variant"))
        after = dict(db.execute("SELECT cell_id, finished FROM cells"))
        assert db.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 8 * 25
    assert counts == {v: 1 for v in [*VARIANTS.split(","), "(reference)"]}
    assert all(after[c] == t for c, t in before.items())  # finished cells were not redone


def test_ctrl_c_finishes_the_step_keeps_finished_cells_and_exits_cleanly(tmp_path: Path, untrained_model: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dpobench", "run", "--model", str(untrained_model), "--variants", VARIANTS,
               "--steps", "25", "--out", str(out), "--no-report", "--parallel-cells", "2"]  # fmt: skip
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_cells(out / "results.sqlite", 1)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "stopping after this step" in stderr
    assert "interrupted: finished cells are in the store; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    with sqlite3.connect(out / "results.sqlite") as db:
        statuses = {r[0] for r in db.execute("SELECT status FROM cells")}
        per_cell = db.execute("SELECT COUNT(*) FROM steps GROUP BY cell_id").fetchall()
    assert statuses == {"done"} and all(n == 25 for (n,) in per_cell)  # no half-trained cell was written


def test_ctrl_c_after_a_cells_last_step_stops_the_sweep_after_that_cell(tmp_path: Path, untrained_model: Path) -> None:
    """Ctrl-C during a cell's evaluation (after its last step) was acknowledged, then forgotten: the sweep trained
    the next cells, or, after the last one, wrote the report and exited 0. The cell is kept, and the sweep stops."""
    from dpobench.data import DataRecipe
    from dpobench.sweep import Progress, SweepConfig, SweepInterrupted, run_sweep
    from dpobench.train import TrainConfig

    class StopDuringFirstEvaluation(Progress):  # the CLI's progress display; the stop request arrives as the cell ends
        stop = False

        def done(self, label: str, status: str, error: str = "", seconds: float = math.nan) -> None:
            self.stop = True

    progress = StopDuringFirstEvaluation()
    config = SweepConfig(variants=("dpo", "ipo"), model=str(untrained_model), train=TrainConfig(steps=2, batch_size=8),
                         data_recipe=DataRecipe(train_prompts=64, heldout_prompts=16, eval_prompts=16))  # fmt: skip
    with pytest.raises(SweepInterrupted, match="stopped after 1 of 2 cells of this run"):
        run_sweep(config, tmp_path, progress=lambda m: None, cell_progress=progress, should_stop=lambda: progress.stop)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        cells = dict(db.execute("SELECT variant, status FROM cells"))
    # the cell that finished first (side by side, either), and not the other, which stopped at its next step
    assert len(cells) == 2 and cells.pop("(reference)") == "done" and list(cells.items()) in (
        [("dpo", "done")], [("ipo", "done")]
    )  # fmt: skip


def test_csv_pairs_with_weights(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    path = tmp_path / "pairs.csv"
    pd.DataFrame([{**GOOD, "weight": 0.25}, {**GOOD, "chosen": "i liked the cast .", "weight": ""},
                  {**GOOD, "rejected": "the film was dull .", "weight": 2}]).to_csv(path, index=False)  # fmt: skip
    task = load_pairs_file(path, tokenizer, 64, heldout_fraction=0.34)
    weights = sorted(p.weight for p in task.train.pairs + task.heldout.pairs)
    assert weights == [0.25, 1.0, 2.0]  # an empty weight means 1
    assert tokenizer.decode(task.train.pairs[0].prompt, skip_special_tokens=True) == "the movie was great ."


def test_parquet_without_pyarrow_or_corrupt_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"pairs.parquet: (reading Parquet needs pyarrow|not a readable Parquet file)"):
        load_pairs_file(path, build_tokenizer(), 64)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hugging Face Hub cannot be reached to fetch it (ConnectError"),
        ({"HF_HUB_OFFLINE": "1"}, "the Hugging Face Hub cannot be reached to fetch it (OfflineModeIsEnabled"),
    ],
)
def test_a_hub_id_that_cannot_be_fetched_fails_at_once(tmp_path: Path, env: dict, message: str) -> None:
    """A --model that is no size and no folder is a Hub id; offline, transformers retried for about 45 s and then
    named neither the Hub nor the network. One quick request now says which (a closed port stands in for no
    network; offline mode is transformers' own)."""
    result = dpobench_run("run", "--model", "someorg/no-such-model", "--out", str(tmp_path / "out"), **env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_ctrl_c_while_the_sweep_starts_says_what_it_stopped(tmp_path: Path, untrained_model: Path) -> None:
    """Ctrl-C while pairs were sampled said "finished cells are in the store" though no cell had started; it says
    which step of the start it stopped, and leaves nothing of it in the cache or in --out."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "dpobench", "run", "--model", str(untrained_model), "--variants", "dpo",
               "--out", str(out), "--no-report"]  # fmt: skip
    process = subprocess.Popen(command, env=subprocess_env(DPOBENCH_CACHE=str(cache)), stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # until the start announces the sampling
        lines.append(line)
        if line.startswith("sampling preference pairs"):
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stderr = "".join(lines) + process.stderr.read()
    assert process.wait(timeout=60) == 130, stderr
    assert "interrupted while the sweep started (sampling preference pairs from the reference model (cached for " \
        "later runs)): nothing of that step is kept; rerun the same command to start again" in " ".join(stderr.split())  # fmt: skip
    assert "Traceback" not in stderr and not list(cache.glob("pairs/*.json"))
    assert claims_nothing(out)
