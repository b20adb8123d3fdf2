"""Plugin loading: entry points, loose files, filtering, provenance, and every kind of broken plugin."""

from __future__ import annotations

import os
import types
import warnings
from pathlib import Path

import pytest

import dpobench
from dpobench import plugins
from dpobench.losses import PreferenceLoss

from .conftest import BROKEN_PLUGINS, ROOT

BUILTIN_MODULES = {"dpo", "pairwise", "reference_free", "regularised", "seed", "combinations", "token_level", "adaptive",
                   "unpaired"}  # fmt: skip

EXPECTED_VARIANTS = {
    # the seed's own
    "dpo", "cdpo", "seed_robust_dpo", "seed_kl_dpo", "seed_custom_dpo",
    # every TRL 1.16 loss_type (sigmoid = dpo, robust = robust_dpo)
    "hinge", "ipo", "exo_pair", "nca_pair", "robust_dpo", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    # reference-free
    "cpo", "simpo", "simpo_trl", "orpo",
    # beyond TRL
    "len_reg_dpo", "dpop", "cal_dpo", "ipo_paper",
    # modifiers and presets
    "fdpo_forward_kl", "fdpo_js", "fdpo_alpha", "wpo", "combined", "rpo", "mpo",
    # the field beyond TRL 1.16's DPOTrainer (issue 22): no new inputs
    "alphapo", "simper", "kto_pair", "dpo_shift", "chipo",
    # per-token log-probs, score margins, state across steps
    "ld_dpo", "sampo", "tdpo", "odpo", "beta_dpo", "tr_dpo",
    # unpaired examples
    "kto", "apo_zero_unpaired", "bco",
}  # fmt: skip


def test_builtins_load_through_entry_points_with_provenance() -> None:
    state = plugins.load_plugins()
    assert state.errors == []
    assert set(state.registry) == EXPECTED_VARIANTS
    assert {name for name, info in state.info.items() if info.builtin} == BUILTIN_MODULES
    for spec in state.registry.values():
        assert spec.plugin in BUILTIN_MODULES
        assert spec.version == dpobench.__version__
    assert state.registry["cdpo"].preset_of == "dpo" and state.registry["dpo"].preset_of is None
    assert state.registry["cdpo"].defaults == {"label_smoothing": 0.1}


def test_get_losses_is_sorted_and_get_loss_builds_fresh_objects() -> None:
    names = list(dpobench.get_losses())
    assert names == sorted(names)
    a, b = dpobench.get_loss("ipo", beta=0.2), dpobench.get_loss("ipo", beta=0.2)
    assert a is not b and a.beta == 0.2 and a.name == "ipo"
    assert dpobench.get_loss("cdpo").label_smoothing == 0.1
    assert dpobench.get_loss("cdpo", label_smoothing=0.2).label_smoothing == 0.2


def test_unknown_variant_suggests_the_closest() -> None:
    with pytest.raises(dpobench.UnknownLossError, match="unknown loss variant 'simp0'; did you mean 'simpo'"):
        dpobench.get_loss("simp0")


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dpo", {"beta": 0}, "loss 'dpo': parameter beta=0 is outside its valid range (0, inf)"),
        ("dpo", {"beta": -1.0}, "outside its valid range (0, inf)"),
        (
            "cdpo",
            {"label_smoothing": 0.5},
            "loss 'cdpo': parameter label_smoothing=0.5 is outside its valid range [0, 0.5)",
        ),
        ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing=0.0 is outside its valid range (0, 1)"),
        (
            "dpo",
            {"betta": 0.1},
            "unknown parameter 'betta' (valid parameters: beta, f_alpha, f_divergence, label_smoothing)",
        ),
        ("dpo", {"beta": "abc"}, "parameter beta='abc' must be a number"),
        ("dpo", {"beta": float("nan")}, "must be a number, not NaN"),
        (
            "dpo",
            {"f_divergence": "kl"},
            "must be one of 'reverse_kl', 'forward_kl', 'js_divergence', 'alpha_divergence'",
        ),
        ("ipo", {"length_normalize": "maybe"}, "must be true or false"),
        ("wpo", {"base": "nope"}, "unknown loss variant 'nope'"),
        ("combined", {"components": "dpo"}, "must be (name, weight) pairs"),
    ],
)
def test_parameters_are_validated_when_the_loss_is_built(name: str, params: dict, message: str) -> None:
    with pytest.raises((dpobench.ParamError, dpobench.UnknownLossError)) as info:
        dpobench.get_loss(name, **params)
    assert message in str(info.value)


def test_parameters_from_strings_are_coerced() -> None:
    loss = dpobench.get_loss("ipo", beta="0.5", length_normalize="false")
    assert loss.beta == 0.5 and loss.length_normalize is False
    # allowed values given as numbers: "--param x.scale=2" arrives as "2", which was refused as not among 1, 2, 4
    scale = dpobench.Param(1, (1, 2, 4.0), "scale")
    assert scale.check("scale", "2", "loss 'x'") == 2 and scale.check("scale", "4", "loss 'x'") == 4.0
    with pytest.raises(dpobench.ParamError, match=r"loss 'x': parameter scale='3' must be one of 1, 2, 4.0"):
        scale.check("scale", "3", "loss 'x'")


def broken_state() -> plugins.Plugins:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plugins.load_plugins([BROKEN_PLUGINS])


@pytest.mark.parametrize(
    "expected",
    [
        "plugin 'import_error' ("
        + str(BROKEN_PLUGINS / "import_error.py")
        + ") failed to import: ModuleNotFoundError: No module named 'dpobench_no_such_module'",
        "plugin 'misspelled_hook' implements hook 'register_loss', which dpobench does not define (hooks: register_losses)",
        "variant 'dpo' is registered twice: by plugin 'dpo' and by plugin 'duplicate_name'; rename one of them",
        "plugin 'hook_raises': register_losses raised ValueError: cannot find my configuration",
    ],
)
def test_broken_plugins_get_one_line_errors_naming_them(expected: str) -> None:
    errors = broken_state().errors
    assert expected in errors
    assert all("\n" not in e for e in errors)


def test_good_plugins_still_load_beside_broken_ones() -> None:
    state = broken_state()
    assert len(state.errors) == 4
    assert EXPECTED_VARIANTS <= set(state.registry)
    assert state.registry["squared_hinge"].plugin == "good_plugin"
    assert state.registry["squared_hinge"].version.startswith("file-")
    assert state.registry["dpo"].plugin == "dpo"  # the built-in keeps its name
    assert "half_registered" not in state.registry  # a plugin whose hook raised registers nothing


@pytest.mark.parametrize(
    ("variant", "check", "message"),
    [
        (
            "raising_loss",
            "shapes and finite values",
            "calling the loss raised RuntimeError: this loss is broken on purpose",
        ),
        ("nan_loss", "shapes and finite values", "losses has 8 non-finite value(s) (NaN or inf) for ordinary inputs"),
        ("wrong_shape", "shapes and finite values", "losses has shape () for a batch of 8 pairs; expected (8,)"),
        (
            "backward_raises",
            "gradients reach the policy, not the reference",
            "the loss's backward pass raised RuntimeError: one of the variables needed for gradient computation has "
            "been modified by an inplace operation",
        ),
    ],
)
def test_broken_losses_fail_the_contract_in_words(variant: str, check: str, message: str) -> None:
    from dpobench.testing import check_loss

    report = check_loss(broken_state().registry[variant])
    assert not report.ok
    failure = next(r for r in report.failures if r.check == check)
    assert message in failure.message
    assert f"variant {variant!r} (plugin {variant!r}): FAILS" in str(report)


def test_plugins_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text((BROKEN_PLUGINS / "good_plugin.py").read_text())
    monkeypatch.setenv("DPOBENCH_PLUGINS_DIR", str(tmp_path))
    assert dpobench.get_losses()["squared_hinge"].plugin == "mine"


def test_missing_plugins_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is neither a directory nor a \.py file"):
        plugins.load_plugins([tmp_path / "nope"])


def test_load_plugins_filter_applies_to_external_plugins_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test session sets DPOBENCH_LOAD_PLUGINS="" and still has every built-in.
    assert os.environ["DPOBENCH_LOAD_PLUGINS"] == ""
    assert set(dpobench.get_losses()) == EXPECTED_VARIANTS
    monkeypatch.setenv("DPOBENCH_LOAD_PLUGINS", "something-else")
    assert set(dpobench.get_losses()) == EXPECTED_VARIANTS
    # a name that no installed plugin has is a typo, said once: it loaded nothing without a word
    assert plugins.plugin_errors() == [
        "DPOBENCH_LOAD_PLUGINS names 'something-else', which is no installed plugin or distribution; "
        "`dpobench plugins` lists the installed ones"
    ]


def test_temporary_plugin_registers_and_unregisters() -> None:
    from dpobench_plugins.dpo import DPOLoss

    @dpobench.hookimpl
    def register_losses(register):
        register(DPOLoss, name="dpo_beta_half", beta=0.5)

    module = types.SimpleNamespace(register_losses=register_losses)
    with plugins.temporary_plugin(module, "throwaway"):
        spec = dpobench.get_losses()["dpo_beta_half"]
        assert (spec.plugin, spec.version, spec.preset_of) == ("throwaway", "test", "dpo")
        assert dpobench.get_loss("dpo_beta_half").beta == 0.5
    assert "dpo_beta_half" not in dpobench.get_losses()


def test_unmarked_hook_and_hookless_plugin_are_reported() -> None:
    def register_losses(register):  # no @hookimpl
        raise AssertionError("never called")

    state = plugins.load_plugins(extra={"unmarked": types.SimpleNamespace(register_losses=register_losses)})
    assert state.errors == [
        "plugin 'unmarked': function 'register_losses' is not decorated with @dpobench.hookimpl, "
        "so dpobench would never call it"
    ]
    state = plugins.load_plugins(extra={"empty": types.SimpleNamespace()})
    assert state.errors == [
        "plugin 'empty' implements no dpobench hook: define `register_losses(register)` decorated with "
        "@dpobench.hookimpl"
    ]


def _subclass(**attributes) -> type:
    return type("Custom", (dpobench.get_losses()["dpo"].cls,), {"name": "custom", **attributes})


@pytest.mark.parametrize(
    ("registration", "message"),
    [
        (lambda register: register(object), "is not a dpobench.PreferenceLoss subclass"),
        (lambda register: register(PreferenceLoss), "with name '': a name must be lower snake case"),
        (
            lambda register: register(dpobench.get_losses()["dpo"].cls, name="Bad-Name"),
            "a name must be lower snake case",
        ),
        (
            lambda register: register(dpobench.get_losses()["dpo"].cls, name="dpo_zero", beta=0.0),
            "plugin 'bad', variant 'dpo_zero': parameter beta=0.0 is outside its valid range (0, inf)",
        ),
        (  # the class's own default, never checked: it trained
            lambda register: register(_subclass(params={"scale": dpobench.Param(20.0, "(0, 10]", "s")})),
            "plugin 'bad', variant 'custom': parameter scale=20.0 is outside its valid range (0, 10]",
        ),
        (  # one plugin, one name, two registrations: the message named the plugin twice as if two were involved
            lambda register: [register(_subclass()), register(_subclass())],
            "plugin 'bad' registers variant 'custom' twice; register it once",
        ),
        (  # "weight" for "weights": it trained unweighted, silently
            lambda register: register(_subclass(inputs=frozenset({"weight"}))),
            "plugin 'bad', variant 'custom': unknown input 'weight' in inputs; known: kl_logps, logsumsq, margin, moving_reference, token_kl, token_logps, weights",
        ),
        (  # a paired loss is never given mismatched rows, nor an unpaired one per-token log-probs: both would train
            # without the input they declared
            lambda register: register(_subclass(inputs=frozenset({"kl_logps"}))),
            "plugin 'bad', variant 'custom': input 'kl_logps' is for unpaired losses; a paired loss can read "
            "logsumsq, margin, moving_reference, token_kl, token_logps, weights",
        ),
        (
            lambda register: register(
                type(
                    "Custom",
                    (dpobench.get_losses()["kto"].cls,),
                    {"name": "custom", "inputs": frozenset({"token_logps"})},
                )
            ),
            "plugin 'bad', variant 'custom': input 'token_logps' is for paired losses; an unpaired loss can read kl_logps",
        ),
        (
            lambda register: register(dpobench.get_losses()["dpo"].cls, name="dpo_two", paper=2024),
            "plugin 'bad', variant 'dpo_two': paper=2024; give the preset's paper as text, e.g. 'arXiv:2411.10442'",
        ),
        (
            lambda register: register(dpobench.get_losses()["dpo"].cls, name="dpo_two", paper=" "),
            "variant 'dpo_two': paper=' '; give the preset's paper as text",
        ),
        (
            lambda register: register(dpobench.get_losses()["dpo"].cls, name="dpo_two", tags=("Main",)),
            "variant 'dpo_two': tags=['Main']; each tag is a lower snake case name",
        ),
        (  # a study of a parameter the variant does not have would draw nothing, silently
            lambda register: register(
                dpobench.get_losses()["dpo"].cls, name="dpo_two", study=dpobench.Study(params=("temperature",))
            ),
            "variant 'dpo_two': its study names 'temperature', which is not one of its parameters",
        ),
        (
            lambda register: register(dpobench.get_losses()["dpo"].cls, name="dpo_two", study=("beta",)),
            "variant 'dpo_two': study= takes a dpobench.Study naming one or more of its parameters",
        ),
    ],
)
def test_invalid_registrations_are_reported(registration, message: str) -> None:
    dpobench.get_losses()  # the built-ins' classes are needed by the lambdas

    @dpobench.hookimpl
    def register_losses(register):
        registration(register)

    state = plugins.load_plugins(extra={"bad": types.SimpleNamespace(register_losses=register_losses)})
    assert len(state.errors) == 1 and message in state.errors[0]


def test_every_hook_is_documented_in_the_readme_and_tested() -> None:
    # datasette's rule: a hook nobody documented or tested is a hook nobody can rely on.
    from dpobench import hookspecs

    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "dpobench_spec")]
    readme = (ROOT / "README.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert hooks == ["register_losses"]
    for hook in hooks:
        assert f"`{hook}" in readme, f"hook {hook} is not documented in README.md"
        assert f"def {hook}(" in tests, f"hook {hook} has no test that implements it"


def test_readme_names_every_variant() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in EXPECTED_VARIANTS if f"`{name}`" not in readme]
    assert not missing, f"README.md does not mention {missing}"


def test_readme_api_example_runs() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## The Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # IPO (TRL, length-normalised) on Δc = 1 over 5 tokens, Δr = −1 over 4: (0.2 + 0.25 − 5)²
    assert float(namespace["out"].losses[0]) == pytest.approx((0.45 - 5) ** 2)


def test_all_variants_train_each_loss_once() -> None:
    """The default run trained `combined` (DPO + SFT at its defaults) and `rpo` (its preset DPO + SFT): the same
    loss twice, bit-identical cells listed as two variants. A generic variant whose defaults equal a named preset's
    is left out of "all"; one with other defaults (dpo beside cdpo) is not."""
    from dpobench.sweep import distinct_variants

    registry = dpobench.get_losses()
    assert registry["combined"].build().hparams == registry["rpo"].build().hparams
    assert distinct_variants(registry) == [name for name in registry if name != "combined"]


def test_tags_and_studies_are_declared_by_plugins() -> None:
    # the core names no variant: the standard preset's set and the seed loss's study come from registrations
    registry = dpobench.get_losses()
    main = sorted(name for name, spec in registry.items() if "main" in spec.tags)
    assert main == ["apo_zero", "cal_dpo", "cdpo", "cpo", "discopop", "dpo", "dpop", "hinge", "ipo", "len_reg_dpo",
                    "orpo", "robust_dpo", "rpo", "simpo", "sppo_hard"]  # fmt: skip
    study = registry["seed_custom_dpo"].study
    assert study.params == ("length_normalization", "confidence_weighting")
    assert study.label({"confidence_weighting": True, "length_normalization": False}) == "confidence-weighted"
    assert dpobench.Study(params=("a", "b")).label({"a": 1, "b": 0.5}) == "a=1, b=0.5"  # unlabelled: its values
    assert [name for name, spec in registry.items() if spec.study] == ["seed_custom_dpo"]
