"""Pairs from Hugging Face dataset folders (save_to_disk) in TRL's conventions: explicit prompt, implicit prompt,
conversational rows through a chat template, and --split. Datasets are built here with a real `datasets`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dpobench.data import DataError, load_pairs_file
from dpobench.task import build_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets not installed")

TEXT = [{"prompt": "the movie was", "chosen": "great", "rejected": "awful"},
        {"prompt": "the plot was", "chosen": "good", "rejected": "boring"},
        {"prompt": "i watched it on a", "chosen": "friday . i loved the cast", "rejected": "monday . i hated the cast"}]  # fmt: skip
#: renders the messages' contents one after another: the task tokenizer knows only the grammar's words, no roles
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def pairs_of(task) -> list:
    """Every pair's (prompt, chosen, rejected), in one order whatever the held-out draw."""
    return sorted((p.prompt, p.chosen, p.rejected) for p in task.train.pairs + task.heldout.pairs)


def save(rows: list[dict], folder: Path, splits: dict[str, list[dict]] | None = None) -> Path:
    import datasets

    if splits is None:
        datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    else:
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    return folder


def test_a_dataset_folder_gives_the_pairs_its_rows_give_as_a_file(tmp_path: Path) -> None:
    """The same rows as a JSONL file and as a save_to_disk folder (a DatasetDict: its train split by default, --split
    picks another) load into the same pairs."""
    tokenizer = build_tokenizer()
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    other = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in TEXT]  # the test split: swapped
    folder = save([], tmp_path / "ds", splits={"train": TEXT, "test": other})
    from_file = pairs_of(load_pairs_file(jsonl, tokenizer, 64))
    assert pairs_of(load_pairs_file(folder, tokenizer, 64)) == from_file
    swapped = pairs_of(load_pairs_file(folder, tokenizer, 64, split="test"))
    assert sorted((prompt, rejected, chosen) for prompt, chosen, rejected in swapped) == from_file
    with pytest.raises(DataError, match=r"ds: no split 'validation'; it has train, test \(choose one with --split\)"):
        load_pairs_file(folder, tokenizer, 64, split="validation")


def test_an_implicit_prompt_is_the_shared_start_of_chosen_and_rejected(tmp_path: Path) -> None:
    """TRL's convention: rows of chosen and rejected alone, whose shared start is the prompt, cut before the space
    ("the movie was" | " great" and " awful")."""
    tokenizer = build_tokenizer()
    implicit = [{"chosen": f"{r['prompt']} {r['chosen']}", "rejected": f"{r['prompt']} {r['rejected']}"} for r in TEXT]
    explicit = pairs_of(load_pairs_file(save(TEXT, tmp_path / "explicit"), tokenizer, 64))
    assert pairs_of(load_pairs_file(save(implicit, tmp_path / "implicit"), tokenizer, 64)) == explicit


def test_conversational_rows_go_through_the_chat_template(tmp_path: Path) -> None:
    """Messages rendered by the tokenizer's template: the prompt is the prompt's rendering with the generation
    prompt, each completion what the whole conversation adds to it (TRL's maybe_apply_chat_template), tokenized as
    rendered (no BOS added), EOS closing each completion. An implicit conversational prompt is the messages chosen
    and rejected share. A tokenizer without a template is refused in one line."""
    tokenizer = build_tokenizer()
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    bot = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    chat = [{"prompt": user(r["prompt"]), "chosen": bot(r["chosen"]), "rejected": bot(r["rejected"])} for r in TEXT]
    folder = save(chat, tmp_path / "chat")
    with pytest.raises(DataError, match=r"chat:row 1: conversational rows \(lists of messages\) need a chat template"):
        load_pairs_file(folder, tokenizer, 64)
    tokenizer.chat_template = TEMPLATE
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    expected = sorted((tuple(ids(r["prompt"] + " ")), (*ids(r["chosen"] + " "), tokenizer.eos_token_id),
                       (*ids(r["rejected"] + " "), tokenizer.eos_token_id)) for r in TEXT)  # fmt: skip
    got = pairs_of(load_pairs_file(folder, tokenizer, 64))
    assert got == expected and all(p[0][0] != tokenizer.bos_token_id for p in got)
    implicit = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in chat]
    got = pairs_of(load_pairs_file(save(implicit, tmp_path / "ic"), tokenizer, 64))
    assert got == expected


def test_a_folder_that_is_not_a_dataset_and_split_without_one_are_refused(
    tmp_path: Path, untrained_model: Path
) -> None:
    from dpobench.config import SweepError, load_config
    from dpobench.sweep import run_sweep

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a folder written by save_to_disk"):
        load_pairs_file(tmp_path / "empty", build_tokenizer(), 64)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    config = load_config({"model": str(untrained_model), "data": str(jsonl), "split": "test", "variants": "dpo"})
    with pytest.raises(SweepError, match=r"^--split test: picks a split of a dataset folder"):
        run_sweep(config, tmp_path / "out", progress=lambda m: None)


def test_a_sweep_trains_on_a_dataset_folder(tmp_path: Path, untrained_model: Path) -> None:
    from dpobench.config import load_config
    from dpobench.sweep import run_sweep

    rows = TEXT * 4  # 12 pairs: 1 held out, 11 to train on
    folder = save([], tmp_path / "ds", splits={"train": rows[:6], "test": rows})
    config = load_config({"model": str(untrained_model), "data": str(folder), "split": "test", "variants": "dpo,ipo",
                          "steps": 2, "batch_size": 4, "step_cost_rounds": 0})  # fmt: skip
    summary = run_sweep(config, tmp_path / "out", progress=lambda m: None)
    assert (summary.status == "done").all() and summary.heldout_reward_accuracy.notna().sum() == 2
    from dpobench.tables import run_info

    assert run_info(tmp_path / "out")[0]["info"]["pairs"] == 12  # the test split, not train's 6


def test_a_hub_dataset_name_loads_from_the_local_cache_offline(tmp_path: Path, untrained_model: Path) -> None:
    """`--data org/name` is loaded by `datasets.load_dataset`: offline, from its local cache (here a cache entry as a
    download leaves one, made by datasets from a JSONL of the rows and filed under the Hub name); a name the cache
    does not hold is one line, before anything trains. Child processes: datasets reads HF_HOME and offline mode
    when it is imported."""
    import shutil
    import subprocess
    import sys

    import datasets

    from .conftest import subprocess_env

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in TEXT * 4))
    built = tmp_path / "built"
    datasets.load_dataset("json", data_files=str(rows), split="train", cache_dir=str(built))
    (info,) = built.glob("json/*/*/*/dataset_info.json")  # json/<config>/<version>/<fingerprint>/
    entry = tmp_path / "hf" / "datasets" / "someorg___reviews" / "default" / "0.0.0" / info.parent.name
    shutil.copytree(info.parent, entry)
    (entry / "json-train.arrow").rename(entry / "reviews-train.arrow")  # a download names it after the dataset
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = [sys.executable, "-m", "dpobench", "run", "--model", str(untrained_model), "--variants", "dpo", "--steps",
           "2", "--batch-size", "4", "--no-report", "--step-cost-rounds", "0"]  # fmt: skip
    done = subprocess.run([*run, "--data", "someorg/reviews", "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "11 training pairs, 1 held-out pairs" in done.stderr  # 12 rows: a tenth (1) held out
    assert "Using the latest cached version" not in done.stderr  # datasets' notices stay out of the sweep's output
    missing = subprocess.run([*run, "--data", "someorg/nothing", "--out", str(tmp_path / "none")],
                             capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("error: someorg/nothing: no such file or folder, and no Hugging Face dataset of "
                                     "that name that datasets can load (")  # fmt: skip
    assert not (tmp_path / "none").exists()
