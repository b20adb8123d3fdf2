"""The registry of loss variants: what plugins registered, under which name, from which plugin."""

from __future__ import annotations

import difflib
import inspect
import re
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dpobench.losses import KL_LOGPS, KNOWN_INPUTS, Param, ParamError, PreferenceLoss

__all__ = [
    "LossSpec", "RegisterLoss", "RegistrationError", "Registry", "Study", "UnknownLossError", "docstring_section",
]  # fmt: skip

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RegistrationError(ValueError):
    """A plugin registered something that is not a valid variant (or a name that is taken)."""


class UnknownLossError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


class RegisterLoss(Protocol):
    def __call__(
        self, cls: type[PreferenceLoss], name: str | None = None, *, paper: str | None = None,
        tags: Iterable[str] = (), study: Study | None = None, **defaults: Any,
    ) -> None: ...  # fmt: skip


@dataclass(frozen=True)
class Study:
    """A parameter study a variant declares: the report compares the configurations of ``params`` that ran (two or
    more), one bar per configuration, each the mean over its cells.

    ``labels`` names a configuration by its values of ``params``, in order (``{(False, True): "confidence-weighted"}``);
    a configuration without a label is named by its values."""

    params: tuple[str, ...]
    title: str = ""
    text: str = ""
    labels: Mapping[tuple[Any, ...], str] = field(default_factory=dict)

    def label(self, values: Mapping[str, Any]) -> str:
        """The name of the configuration with these parameter values."""
        key = tuple(values[p] for p in self.params)
        return self.labels.get(key) or ", ".join(f"{p}={v}" for p, v in zip(self.params, key, strict=True))


@dataclass(frozen=True)
class LossSpec:
    """One registered variant: a class, the defaults of its preset, and who registered it."""

    name: str
    cls: type[PreferenceLoss]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    plugin: str = ""
    version: str = ""
    #: the class's own name when this spec is a preset of it under another name (``cdpo`` of ``dpo``)
    preset_of: str | None = None
    #: the preset's own paper, where it is not the class's (f-DPO's presets of DPO)
    paper_override: str | None = None
    #: labels a sweep can select by (the ``standard`` preset trains the variants tagged "main")
    tags: frozenset[str] = frozenset()
    #: the parameter study the report draws for this variant, if it declares one
    study: Study | None = None

    def build(self, **overrides: Any) -> PreferenceLoss:
        """A fresh loss object; ``overrides`` replace the preset's defaults and are validated."""
        try:
            loss = self.cls(**{**self.defaults, **overrides})
        except ParamError as err:
            raise ParamError(str(err).replace(f"loss {self.cls.name!r}", f"loss {self.name!r}", 1)) from None
        loss.name = self.name  # a preset reports its own name in outputs and errors
        return loss

    @property
    def params(self) -> dict[str, Param]:
        """The declared parameters with this preset's defaults in place of the class's."""
        return {key: Param(self.defaults.get(key, p.default), p.valid, p.doc) for key, p in self.cls.params.items()}

    @property
    def reference_free(self) -> bool:
        # Combinations decide per instance (RPO is reference-based because DPO is).
        return self.build().reference_free

    @property
    def inputs(self) -> tuple[str, ...]:
        """What the variant reads: the summed log-probs of chosen and rejected (the policy's, and the reference's
        unless it is reference-free), or of unpaired examples with their labels, their token counts, and what it
        declares beyond them (``PreferenceLoss.inputs``, per instance: WPO's depend on its base, each with what it
        costs or where it comes from); "batch" where a pair's loss depends on the rest of the batch."""
        loss = self.build()
        read = ["unpaired examples (labels)"] if loss.unpaired else []
        read += ["policy log-probs"] + ([] if loss.reference_free else ["reference log-probs"]) + ["token counts"]
        declared = [f"{name} ({INPUT_NOTES[name]})" if name in INPUT_NOTES else name for name in sorted(loss.inputs)]
        return (*read, *declared, *(["batch"] if loss.batch_coupled else []))

    @property
    def paper(self) -> str:
        return self.paper_override or self.cls.paper

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""

    @property
    def formula(self) -> str:
        return docstring_section(self.cls.__doc__ or "", "Formula")


#: what ``dpobench list -v`` adds to a declared input's name: where it comes from, or what it costs
INPUT_NOTES = {
    "weights": "per pair, from the data",
    "margin": "per pair, from the data's scores",
    "token_logps": "per token, policy and reference",
    "token_kl": "over the vocabulary, a reference pass per step",
    "logsumsq": "per token, policy",
    "kl_logps": "mismatched prompt/completion rows, a no-gradient policy pass",
    "moving_reference": "a reference pass per step",
}


def docstring_section(doc: str, title: str) -> str:
    """The indented block under a ``Title:`` line of a docstring, dedented, or ``""``."""
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines):
        if line.strip().rstrip(":") == title and line.strip().endswith(":"):
            block = []
            for follow in lines[i + 1 :]:
                if follow.strip() and not follow.startswith((" ", "\t")):
                    break
                block.append(follow)
            return textwrap.dedent("\n".join(block)).strip()
    return ""


class Registry(Mapping[str, LossSpec]):
    """Name → LossSpec, sorted by name. Filled through ``register`` callbacks, one per plugin."""

    def __init__(self) -> None:
        self._specs: dict[str, LossSpec] = {}

    def callback(self, plugin: str, version: str) -> RegisterLoss:
        """The ``register`` function handed to one plugin's ``register_losses`` hook."""

        def register(
            cls: type[PreferenceLoss], name: str | None = None, *, paper: str | None = None,
            tags: Iterable[str] = (), study: Study | None = None, **defaults: Any,
        ) -> None:  # fmt: skip
            self.add(cls, name=name, plugin=plugin, version=version, paper=paper, tags=tags, study=study, **defaults)

        return register

    def add(
        self, cls: type[PreferenceLoss], *, name: str | None = None, plugin: str, version: str,
        paper: str | None = None, tags: Iterable[str] = (), study: Study | None = None, **defaults: Any,
    ) -> LossSpec:  # fmt: skip
        who = f"plugin {plugin!r}"
        if not (isinstance(cls, type) and issubclass(cls, PreferenceLoss)):
            raise RegistrationError(f"{who} registered {cls!r}, which is not a dpobench.PreferenceLoss subclass")
        spec_name = name or cls.name
        if not spec_name or not _NAME.match(spec_name):
            raise RegistrationError(
                f"{who} registered {cls.__name__} with name {spec_name!r}: a name must be lower snake case"
            )
        if spec_name in self._specs:
            other = self._specs[spec_name]
            if other.plugin == plugin:
                raise RegistrationError(f"{who} registers variant {spec_name!r} twice; register it once")
            raise RegistrationError(
                f"variant {spec_name!r} is registered twice: by plugin {other.plugin!r} and by plugin {plugin!r}; "
                "rename one of them"
            )
        if paper is not None and not (isinstance(paper, str) and paper.strip()):
            raise RegistrationError(
                f"{who}, variant {spec_name!r}: paper={paper!r}; give the preset's paper as text, e.g. 'arXiv:2411.10442'"
            )
        tags = frozenset([tags] if isinstance(tags, str) else tags)
        if not all(isinstance(t, str) and _NAME.match(t) for t in tags):
            raise RegistrationError(f"{who}, variant {spec_name!r}: tags={sorted(map(str, tags))}; each tag is a lower "
                                    "snake case name, e.g. tags=('main',)")  # fmt: skip
        if study is not None:
            if not isinstance(study, Study) or not study.params:
                raise RegistrationError(f"{who}, variant {spec_name!r}: study= takes a dpobench.Study naming one or "
                                        "more of its parameters")  # fmt: skip
            undeclared = [p for p in study.params if p not in cls.params]
            if undeclared:
                raise RegistrationError(f"{who}, variant {spec_name!r}: its study names {undeclared[0]!r}, which is not "
                                        f"one of its parameters ({', '.join(cls.params)})")  # fmt: skip
        kind = {KL_LOGPS} if cls.unpaired else KNOWN_INPUTS - {KL_LOGPS}  # what each kind of loss can be given
        wrong_kind = sorted((set(cls.inputs) & KNOWN_INPUTS) - kind)
        if wrong_kind:
            raise RegistrationError(
                f"{who}, variant {spec_name!r}: input {wrong_kind[0]!r} is for "
                f"{'paired' if cls.unpaired else 'unpaired'} losses; {'an unpaired' if cls.unpaired else 'a paired'} "
                f"loss can read {', '.join(sorted(kind))}"
            )
        unknown = sorted(set(cls.inputs) - KNOWN_INPUTS)
        if unknown:  # a typo ("weight") would train the variant without the input, silently
            raise RegistrationError(
                f"{who}, variant {spec_name!r}: unknown input {unknown[0]!r} in inputs; known: "
                f"{', '.join(sorted(KNOWN_INPUTS))}"
            )
        try:
            # the class's own defaults too: one outside its declared range was never refused
            cls.resolve_params({**{k: p.default for k, p in cls.params.items()}, **defaults},
                               owner=f"{who}, variant {spec_name!r}")  # fmt: skip
        except ParamError as err:
            raise RegistrationError(str(err)) from None
        spec = LossSpec(
            name=spec_name,
            cls=cls,
            defaults=dict(defaults),
            plugin=plugin,
            version=version,
            preset_of=cls.name if spec_name != cls.name else None,
            paper_override=paper,
            tags=tags,
            study=study,
        )
        self._specs[spec_name] = spec
        return spec

    def remove_plugin(self, plugin: str) -> None:
        for key in [k for k, s in self._specs.items() if s.plugin == plugin]:
            del self._specs[key]

    def __getitem__(self, name: str) -> LossSpec:
        try:
            return self._specs[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._specs), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; `dpobench list` shows them all"
            raise UnknownLossError(f"unknown loss variant {name!r}{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._specs))

    def __len__(self) -> int:
        return len(self._specs)
