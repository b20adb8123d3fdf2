"""The command line: list, plugins, check, landscape, and one-line errors."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import dpobench
from dpobench.cli import app

from .conftest import BROKEN_PLUGINS, dpobench_main
from .test_plugins import EXPECTED_VARIANTS

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


def table_rows(stdout: str) -> dict[str, list[str]]:
    """First word of the first cell → the stripped cells of a rich table row."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]
    return {cells[0].split()[0]: cells for cells in rows}


def test_list_shows_every_variant_with_plugin_version_and_paper() -> None:
    result = invoke("list")
    assert result.exit_code == 0
    variants, methods = result.stdout.split("methods beyond offline losses")
    rows = table_rows(variants)
    named = [line.split("│")[1].strip() for line in methods.splitlines() if line.startswith("│")]
    assert [name for name in named if name] == ["best_of_n", "rloo", "grpo", "ppo", "online_<variant>"]
    assert set(rows) == EXPECTED_VARIANTS
    assert rows["simpo"] == ["simpo", "reference_free", dpobench.__version__, "yes", "arXiv:2405.14734"]
    assert rows["cdpo"][0] == "cdpo (dpo preset)"
    # a preset from another paper than its class's cites its own (register(..., paper=...))
    assert rows["fdpo_js"][-1] == "arXiv:2309.16240" and rows["mpo"][-1] == "arXiv:2411.10442"
    assert rows["dpo"][-1] == "arXiv:2305.18290" and rows["rpo"][-1] == "arXiv:2404.19733"
    assert rows["rpo"][3] == "no"  # DPO + SFT needs the reference


def test_list_verbose_shows_formula_and_parameters() -> None:
    result = invoke("list", "--verbose")
    text = result.stdout
    block = text[text.index("robust_dpo  (dpo") :]
    block = block[: block.index("\n\n")]
    assert "ℓ = [ −(1−ε)·logσ(β·δ) + ε·logσ(−β·δ) ] / (1 − 2ε)" in block
    assert "label_smoothing = 0.1  ([0, 0.5)): ε, the probability that a label is flipped" in block


def test_plugins_lists_sources() -> None:
    result = invoke("plugins")
    assert result.exit_code == 0
    rows = table_rows(result.stdout)
    assert rows["reference_free"] == [
        "reference_free",
        dpobench.__version__,
        "builtin",
        "alphapo, cpo, orpo, sft, simper, simpo, simpo_trl",
    ]


def test_verbose_list_says_what_each_variant_reads() -> None:
    """`list -v` names each variant's inputs: the reference's log-probs unless it is reference-free, unpaired examples
    for an unpaired loss, the extras it declares with where each comes from or what it costs, and "batch" where a
    pair's loss depends on the others."""
    text = invoke("list", "-v").stdout
    inputs = {}
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        found = [line.split("inputs: ", 1)[1] for line in lines if line.strip().startswith("inputs: ")]
        if lines and found:
            inputs[lines[0].split()[0]] = found[0]
    assert inputs["dpo"] == "policy log-probs, reference log-probs, token counts"
    assert inputs["simper"] == "policy log-probs, token counts"
    assert inputs["kto_pair"] == "policy log-probs, reference log-probs, token counts, batch"
    read = "policy log-probs, reference log-probs, token counts"
    assert inputs["seed_custom_dpo"] == f"{read}, weights (per pair, from the data)"
    assert inputs["wpo"] == f"{read}, logsumsq (per token, policy)"
    assert inputs["ld_dpo"] == f"{read}, token_logps (per token, policy and reference)"
    assert inputs["odpo"] == f"{read}, margin (per pair, from the data's scores)"
    assert inputs["tr_dpo"] == f"{read}, moving_reference (a reference pass per step)"
    assert inputs["beta_dpo"] == f"{read}, batch"
    assert inputs["kto"] == (f"unpaired examples (labels), {read}, kl_logps (mismatched prompt/completion rows, a "
                             "no-gradient policy pass), batch")  # fmt: skip
    assert len(inputs) == len(dpobench.get_losses())


def test_verbose_list_shows_a_presets_own_paper() -> None:
    """cdpo (a preset of dpo) cites its own paper in `list`; `list -v` showed none, and the class's summary line."""
    result = invoke("list", "-v")
    block = result.stdout.split("cdpo  (dpo")[1].split("\n\n")[0]
    assert f"paper: {dpobench.get_losses()['cdpo'].paper}" in block  # Mitchell 2023, not the DPO paper


def test_check_names_and_files() -> None:
    ok = invoke("check", "dpo", "simpo")
    assert ok.exit_code == 0 and "2 of 2 variants pass the loss contract" in ok.stdout
    bad = invoke("check", str(BROKEN_PLUGINS / "wrong_shape.py"))
    assert bad.exit_code == 1
    assert "✗ shapes and finite values: losses has shape () for a batch of 8 pairs" in bad.stdout


@pytest.mark.parametrize("plugin", ["hook_raises.py", "misspelled_hook.py", "import_error.py"])
def test_check_of_a_broken_plugin_file_names_its_error_only(plugin: str) -> None:
    """Its load error, and nothing else: check also said the file "registers no variant" (exit 2) when its hook
    raised or was misspelt, and then "0 of 0 variants pass"."""
    result = invoke("check", str(BROKEN_PLUGINS / plugin))
    assert result.exit_code == 1 and "variants pass" not in result.stdout
    assert "nothing checked: the plugin failed to load (the error above); fix it and rerun" in result.stderr
    assert f"plugin '{plugin[:-3]}'" in result.stderr and "registers no variant" not in result.stderr


def test_a_plugin_whose_code_changed_trains_anew(tmp_path: Path, untrained_model: Path) -> None:
    """Editing a plugin and rerunning into the same --out reused the old code's cells without a word: a plugin's
    version (a loose file's hash) is now part of its cells' identity, and the report labels the two apart."""
    from dpobench.report import build_report

    example = (Path(__file__).parents[1] / "docs" / "example-plugin" / "dpobench_example.py").read_text()
    plugin = tmp_path / "plugins" / "offset.py"
    plugin.parent.mkdir()
    plugin.write_text(example)
    run = ["--plugins-dir", str(plugin.parent), "run", "--model", str(untrained_model), "--variants", "offset_dpo",
           "--steps", "2", "--no-report", "--out", str(tmp_path / "out")]  # fmt: skip
    assert invoke(*run).exit_code == 0
    again = invoke(*run)
    assert "1 cell, 1 already in the store, 0 to run" in " ".join(again.stderr.split())  # unchanged: resumed
    edited = example.replace("- self.gamma)", "- self.gamma) + 1.0")  # the same parameters, another loss
    assert edited != example
    plugin.write_text(edited)
    dpobench.plugins.reset()  # what a new `dpobench` process starts with: the edited file is read again
    rerun = invoke(*run)
    assert rerun.exit_code == 0 and "1 cell, 0 already in the store, 1 to run" in " ".join(rerun.stderr.split())
    summary = {s.id: s for s in build_report(tmp_path / "out").sections}["summary"].tables[0][1]
    labels = sorted(summary.variant)
    assert len(labels) == 2 and all(label.startswith("offset_dpo[plugin_version=file-") for label in labels)
    low, high = sorted(summary.loss)  # a constant added to the loss: the same gradients, the loss 1 higher
    assert high - low == pytest.approx(1.0, abs=1e-5)


def test_check_of_a_file_named_like_a_builtin_checks_that_file_only(tmp_path: Path) -> None:
    """A loose dpo.py has the built-in module's plugin name, so it is refused; check used to go on and check the
    built-in dpo plugin's 12 variants in its place, as if they were the file's."""
    example = (Path(__file__).parents[1] / "docs" / "example-plugin" / "dpobench_example.py").read_text()
    (tmp_path / "dpo.py").write_text(example)
    clash = invoke("check", str(tmp_path / "dpo.py"))
    assert clash.exit_code == 1 and "nothing checked: the plugin failed to load" in clash.stderr, clash.stdout
    assert f"plugin 'dpo' ({tmp_path / 'dpo.py'}) has the same name as plugin 'dpo' (builtin); it was not loaded; " \
        "rename the file" in " ".join(clash.stderr.split())  # fmt: skip
    (tmp_path / "offset.py").write_text(example)
    renamed = invoke("check", str(tmp_path / "offset.py"))
    assert renamed.exit_code == 0 and "1 of 1 variants pass the loss contract" in renamed.stdout
    assert "offset_dpo" in renamed.stdout and "robust_dpo" not in renamed.stdout


def test_landscape_leaves_out_a_loss_that_is_not_per_pair(tmp_path: Path) -> None:
    """A loss returning the batch's mean fails `check`; landscape plotted it (a batch of one hid the shape) until
    it ran the harness's own per-pair check (its margins now go as one batch, one pair each). The rest is written,
    the exit status says what was left out."""
    out = tmp_path / "landscape.csv"
    result = invoke("--plugins-dir", str(BROKEN_PLUGINS / "wrong_shape.py"), "landscape", "--variants",
                    "wrong_shape,dpo", "--points", "3", "--betas", "0.1", "--out", str(out))  # fmt: skip
    assert result.exit_code == 1
    assert "left out: wrong_shape: ValueError: the loss returned losses of shape () for 3 pairs; expected (3,)" in \
        " ".join(result.stderr.split())  # fmt: skip
    assert "wrote 3 rows (1 variant) to" in result.stdout
    assert sorted(pd.read_csv(out).variant.unique()) == ["dpo"]


def test_plugin_errors_make_list_fail_but_list_the_rest() -> None:
    result = invoke("--plugins-dir", str(BROKEN_PLUGINS), "list")
    assert result.exit_code == 1
    assert "squared_hinge" in result.stdout
    assert "plugin error: plugin 'misspelled_hook' implements hook 'register_loss'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "dpoo"], "error: unknown loss variant 'dpoo'; did you mean 'dpo'?"),
        (["landscape", "--betas", "0.1,-1"], "error: --betas '0.1,-1': every β must be > 0"),
        (
            ["--plugins-dir", "/no/such/dir", "list"],
            "error: plugins path '/no/such/dir' is neither a directory nor a .py file",
        ),
        (["landscape", "--out", "/proc/nope/l.csv", "--variants", "dpo"], "error: cannot write '/proc/nope/l.csv'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    result = dpobench_main(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_report_on_what_is_not_a_store_with_runs_is_one_line(tmp_path: Path) -> None:
    """A run's summary.csv, another program's SQLite file, a store with no run yet: each named, no traceback."""
    import sqlite3

    from dpobench.store import Store

    (tmp_path / "summary.csv").write_text("variant,beta\ndpo,0.1\n")
    with sqlite3.connect(tmp_path / "other.sqlite") as db:
        db.execute("CREATE TABLE customers (id INTEGER)")
    (tmp_path / "empty").mkdir()
    Store(tmp_path / "empty" / "results.sqlite").close()
    cases = {
        "summary.csv": "not a dpobench results store (",
        "other.sqlite": "not a dpobench results store (",
        "empty": "the store holds no runs yet; run `dpobench run --out",
    }
    for name, message in cases.items():
        result = dpobench_main("report", str(tmp_path / name))
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, (name, result.stderr)


def test_landscape_writes_a_tidy_csv(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "landscape.csv"
    result = invoke(
        "landscape", "--out", str(out), "--variants", "dpo,simpo,sft", "--betas", "0.1,1", "--margin-min", "-4",
        "--margin-max", "4", "--points", "9",
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout
    frame = pd.read_csv(out)
    # dpo: β ∈ {0.1, 1} (0.1 is its default); simpo: {0.1, 1, 2.0 default}; sft: {0.1 default, 1}
    assert len(frame) == 9 * (2 + 3 + 2)
    assert list(frame.columns) == [
        "variant", "plugin", "version", "reference_free", "beta", "beta_is_default", "margin", "tokens",
        "loss", "grad_weight", "preference_prob",
    ]  # fmt: skip
    assert f"wrote {len(frame)} rows (3 variants) to {out}" in " ".join(result.stdout.split())
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_run_from_a_toml_config(tmp_path: Path, untrained_model: Path) -> None:
    config = tmp_path / "sweep.toml"
    settings = f'variants = ["dpo", "simpo"]\nbetas = [0.1, 0.5]\nsteps = 2\nmodel = "{untrained_model}"\n'
    config.write_text(settings + "compile = false\n")
    # no report: the summary, the terminal table and the verdict are what this test reads (test_report reads reports)
    result = invoke("run", "--config", str(config), "--no-report", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stdout + result.stderr
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert sorted(summary.variant.unique()) == ["(reference)", "dpo", "simpo"]
    assert sorted(summary[summary.variant == "dpo"].beta) == [0.1, 0.5]
    assert (summary.status == "done").all()
    # not a terminal, so no progress bar: a line per finished cell, so that a log shows the sweep moving
    assert sum(": done in " in line for line in result.stderr.splitlines()) == 4, result.stderr
    assert "[1/4] dpo β=0.1 seed=0 clean: done in" in result.stderr
    first_words = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"dpo", "simpo", "(reference)"} <= first_words  # the terminal summary, then the verdict: an untrained
    assert "No pick: every configuration's samples are degenerate (under 80% grammatical" in result.stderr  # no grammar
    # The command line overrides the file: one more β, the finished cells are not run again. Without the compile key
    # the default applies, which is off on the CPU: the same cells (stores made before compile=None still resume).
    # Prompt sharing is a batch layout, not part of a cell's id: the cells trained with it (the CPU's default) count
    # as done for a run without it; each run records its layout, and the report pools the cells of both.
    config.write_text(settings)
    again = invoke("run", "--config", str(config), "--betas", "0.1,0.5,1.0", "--no-share-prompt", "--no-report",
                   "--out", str(tmp_path / "out"))  # fmt: skip
    assert again.exit_code == 0
    assert "6 cells, 4 already in the store, 2 to run" in " ".join(again.stderr.split())
    assert len(pd.read_csv(tmp_path / "out" / "summary.csv")) == 7
    with sqlite3.connect(tmp_path / "out" / "results.sqlite") as db:
        layouts = [json.loads(i)["share_prompt"] for (i,) in db.execute("SELECT info FROM runs ORDER BY created")]
        configs = {c for (c,) in db.execute("SELECT config FROM cells WHERE variant = 'dpo'")}
        plugins = [json.loads(i)["plugins"] for (i,) in db.execute("SELECT info FROM runs ORDER BY created")]
    assert layouts == [True, False] and len(configs) == 1 and "share_prompt" not in configs.pop()
    version = dpobench.__version__  # the built-in plugins: dpo (the module) and reference_free (simpo's)
    assert plugins[0] == {"dpo": {"version": version, "source": "builtin"},
                          "reference_free": {"version": version, "source": "builtin"}}  # fmt: skip


def test_the_readmes_config_example_runs_and_variants_narrows_it(tmp_path: Path, untrained_model: Path) -> None:
    """The README's TOML example named params for a variant it did not run, so it failed as written; and a
    --variants that leaves such a variant out failed the same way instead of narrowing the file."""
    config = tmp_path / "sweep.toml"
    config.write_text(f'variants = ["dpo", "seed_custom_dpo"]\nbetas = [0.1, 0.5]\nsteps = 2\nmodel = "{untrained_model}"\n'
                      "[params.seed_custom_dpo]\ntemperature = [0.5, 1.0]\n")  # fmt: skip
    narrowed = invoke("run", "--config", str(config), "--variants", "dpo", "--no-report", "--out", str(tmp_path / "a"))
    assert narrowed.exit_code == 0, narrowed.stderr
    assert "--config: [params.seed_custom_dpo] left out: seed_custom_dpo is not in --variants" in narrowed.stderr
    assert sorted(pd.read_csv(tmp_path / "a" / "summary.csv").variant) == ["(reference)", "dpo", "dpo"]
    whole = invoke("run", "--config", str(config), "--no-report", "--out", str(tmp_path / "b"))
    assert whole.exit_code == 0, whole.stderr
    summary = pd.read_csv(tmp_path / "b" / "summary.csv")
    assert (summary.variant == "seed_custom_dpo").sum() == 4  # 2 temperatures × 2 β


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "stepz = 3\n",
            "unknown key 'stepz'; valid keys: batch_size, betas, cells_per_gpu, chat_prompts, compile, cuda_graphs",
        ),
        ("cuda_graphs = true\ndevice = 'cpu'\n", "--cuda-graphs: CUDA graphs need a CUDA device (this sweep's: 'cpu')"),
        ("steps = \n", "not valid TOML"),
        ('steps = "many"\n', "steps = 'many': expected an integer"),
        ("lr = -1.0\n", "lr = -1: must be > 0 (at 0 every cell would stay the reference model)"),
        ("betas = [0.1, true]\n", "betas = [0.1, True]: expected comma-separated float values"),
        ("preset = 'huge'\n", "--preset 'huge': use one of quick, standard"),
        ('params = "dpo.label_smoothing=0.1"\n', "--config: params must be a table, [params.VARIANT] with KEY"),
        ("seeds = [0.5]\n", "seeds = [0.5]: expected comma-separated int values"),
        ("variants = ','\n", "variants = ',': names no variant; leave it out to run every variant"),
        ("variants = []\n", "variants = []: names no variant; leave it out to run every variant"),
    ],
)
def test_run_config_errors_are_one_line(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = dpobench_main("run", "--config", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_run_options_are_the_configurations_and_their_help_shows_its_defaults() -> None:
    """Every default is written once, in dpobench.config: each option of `dpobench run` is one the configuration
    knows (and a TOML key), and the help of each shows the configuration's default, read from a fresh
    SweepConfig (an independent path from the CLI's own lookup)."""
    import typer.main

    from dpobench.config import FILE_KEYS, SweepConfig

    command = typer.main.get_command(app).commands["run"]
    helps = {p.name: " ".join((p.help or "").split()) for p in command.params}
    shell_only = {"config", "out", "param", "report"}  # where a run's files are, not what it trains
    assert set(helps) - shell_only == FILE_KEYS - {"params"}
    config = SweepConfig()
    defaults = {
        "betas": "0.1", "seeds": "0", "scenarios": "clean", "steps": str(config.train.steps),
        "batch_size": str(config.train.batch_size), "lr": str(config.train.lr), "model": config.model,
        "device": config.device, "eval_every": str(config.train.eval_every),
        "length_buckets": str(config.train.length_buckets), "labels": config.data_recipe.labels, "preset": "quick",
    }  # fmt: skip
    assert (config.betas, config.seeds, config.scenarios) == ((0.1,), (0,), ("clean",))
    for name, value in defaults.items():
        assert f"default {value}" in helps[name], (name, helps[name])
    # the preset's own settings come from the same place: `standard` sets steps, quick takes the configuration's
    from dpobench.config import load_config

    assert load_config({}).train.steps == config.train.steps == 150
    assert load_config({"preset": "standard"}).train.steps == 200
    assert load_config({"preset": "standard", "steps": 7}).train.steps == 7


@pytest.mark.parametrize(
    ("argv", "read_as"),
    [
        (["run", "--plugins-dir", "D", "--steps", "3"], ["--plugins-dir", "D", "run", "--steps", "3"]),
        (["--debug", "run", "--plugins-dir=E", "--debug"], ["--debug", "--plugins-dir=E", "--debug", "run"]),
        (["--plugins-dir", "A", "check", "f.py", "--plugins-dir", "B"],
         ["--plugins-dir", "A", "--plugins-dir", "B", "check", "f.py"]),
        (["run", "--", "--plugins-dir", "X"], ["run", "--", "--plugins-dir", "X"]),  # after --: an argument
        (["--version"], ["--version"]),
    ],
)  # fmt: skip
def test_global_options_may_follow_the_command(argv: list[str], read_as: list[str]) -> None:
    from dpobench.cli import global_options_first

    assert global_options_first(argv) == read_as


def test_plugins_dir_after_the_command_loads_the_plugin() -> None:
    """`dpobench list --plugins-dir FILE` was refused with "No such option"; it lists the file's variant."""
    result = dpobench_main("list", "--plugins-dir", str(BROKEN_PLUGINS / "good_plugin.py"))
    assert result.returncode == 0, result.stderr
    assert "squared_hinge" in result.stdout


def test_a_variant_of_a_plugin_that_failed_to_load_is_named_as_such(tmp_path: Path) -> None:
    """Asking for it suggested a look-alike built-in; it says that a plugin failed to load, before anything runs."""
    from dpobench.cli import CLIError

    with pytest.raises(CLIError, match=r"unknown loss variant 'import_error': 1 plugin failed to load \(the error "
                       r"above\) and may define it; fix it, or drop the variant from --variants"):  # fmt: skip
        invoke("--plugins-dir", str(BROKEN_PLUGINS / "import_error.py"), "run", "--variants", "dpo,import_error",
               "--out", str(tmp_path / "out"))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_the_sampled_pairs_and_the_evaluation_are_sized_from_the_command_line(tmp_path: Path, untrained_model: Path):
    """--train-prompts, --heldout-prompts, --eval-prompts size what dpobench samples (a pretrained model's evaluation
    is most of its cell's time). The evaluation's prompt count is part of a cell's identity: the training pairs do
    not change with it, and a cell evaluated on 8 prompts is not the one evaluated on 16."""
    out = tmp_path / "out"
    run = ["run", "--model", str(untrained_model), "--variants", "dpo", "--steps", "2", "--batch-size", "4",
           "--train-prompts", "40", "--heldout-prompts", "6", "--no-report", "--step-cost-rounds", "0",
           "--out", str(out)]  # fmt: skip
    first = invoke(*run, "--eval-prompts", "16")
    assert first.exit_code == 0, first.stderr
    said = " ".join(first.stderr.split())
    trained, held = (int(n) for n in re.search(r"(\d+) training pairs, (\d+) held-out pairs", said).groups())
    assert 0 < trained <= 40 and 0 < held <= 6  # two samples per prompt; a tie is dropped
    assert set(pd.read_csv(out / "summary.csv").n_samples) == {16}
    fewer = invoke(*run, "--eval-prompts", "8")
    assert "1 cell, 0 already in the store, 1 to run" in " ".join(fewer.stderr.split())
    assert f"{trained} training pairs, {held} held-out pairs" in " ".join(fewer.stderr.split())  # the same pairs
    assert set(pd.read_csv(out / "summary.csv").n_samples) == {8}  # this command's cells: its reference's too
    with sqlite3.connect(out / "results.sqlite") as db:  # both evaluations kept, each with its own reference
        assert db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 4
    again = invoke(*run, "--eval-prompts", "16")
    assert "1 cell, 1 already in the store, 0 to run" in " ".join(again.stderr.split())
