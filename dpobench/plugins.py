"""Plugin loading: entry points of the group ``dpobench``, loose files, and the registry they fill.

Built-in variants live in the import package ``dpobench_plugins`` (the folder ``plugins/``) and are
found through the same entry-point group as any third-party package. ``DPOBENCH_LOAD_PLUGINS``
(comma-separated plugin or distribution names; empty means none) filters the *external* plugins
only, so tests run hermetic with the built-ins. ``DPOBENCH_PLUGINS_DIR`` (or ``--plugins-dir``)
adds loose ``.py`` files — loading them executes their code.

A plugin that fails (import error, misspelled hook, hook that raises, invalid or duplicate
registration) is reported by name in one line and left out; the others still load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from dpobench import hookspecs
from dpobench._util import one_line as _one_line
from dpobench.losses import PreferenceLoss
from dpobench.registry import LossSpec, RegistrationError, Registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "Plugins",
    "get_loss",
    "get_losses",
    "load_plugins",
    "plugin_errors",
    "reset",
    "temporary_plugin",
]

ENTRY_POINT_GROUP = "dpobench"
BUILTIN_PACKAGE = "dpobench_plugins"
HOOKS = ("register_losses",)


class PluginWarning(UserWarning):
    """A plugin failed to load or register; the message names it."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    source: str  # "builtin", "entry point of <dist>", or a file path
    builtin: bool = False


@dataclass
class Plugins:
    """The outcome of one load: the plugin manager, what loaded, what failed, and the registry."""

    pm: pluggy.PluginManager
    info: dict[str, PluginInfo] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    registry: Registry = field(default_factory=Registry)


def load_plugins(paths: Sequence[str | os.PathLike[str]] = (), extra: dict[str, Any] | None = None) -> Plugins:
    """Load built-in, installed and loose-file plugins and fill a fresh registry.

    ``paths`` are directories of ``.py`` files or single ``.py`` files, loaded in addition to
    ``DPOBENCH_PLUGINS_DIR``. ``extra`` maps plugin names to objects with hook implementations
    (tests register throwaway plugins this way).
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    state = Plugins(pm=pm)

    allowed = os.environ.get("DPOBENCH_LOAD_PLUGINS")
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    installed = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (not _is_builtin(e.value), e.name))
    named = {n for ep in installed for n in (ep.name, ep.dist.name if ep.dist else "")}
    for name in sorted((allowed_names or set()) - named):  # a typo would load nothing without a word
        state.errors.append(
            f"DPOBENCH_LOAD_PLUGINS names {name!r}, which is no installed plugin or distribution; `dpobench plugins` "
            "lists the installed ones"
        )
    for ep in installed:
        builtin = _is_builtin(ep.value)
        dist = ep.dist.name if ep.dist else "unknown"
        if not builtin and allowed_names is not None and not ({ep.name, dist} & allowed_names):
            continue
        version = ep.dist.version if ep.dist else "unknown"
        source = "builtin" if builtin else f"entry point of {dist}"
        try:
            module = ep.load()
        except Exception as err:  # a broken plugin must not take the others down
            state.errors.append(f"plugin {ep.name!r} ({ep.value}) failed to import: {_one_line(err)}")
            continue
        if not builtin:  # an editable install keeps its version while its code changes: the code's hash tells
            version = f"{version}+src-{_source_hash(module)}"
        _add(state, module, PluginInfo(ep.name, version, source, builtin))

    for path in _plugin_files([*_env_paths(), *paths]):
        name = path.stem
        version = "file-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        try:
            module = _import_file(path)
        except Exception as err:
            state.errors.append(f"plugin {name!r} ({path}) failed to import: {_one_line(err)}")
            continue
        _add(state, module, PluginInfo(name, version, str(path.resolve())))  # absolute: the store keeps it

    for name, obj in (extra or {}).items():
        _add(state, obj, PluginInfo(name, "test", "registered in-process"))

    _check_pending(state)
    _fill_registry(state)
    return state


def _source_hash(module: ModuleType) -> str:
    """12 hex digits of the SHA-256 of a plugin module's source: its file, or every ``.py`` file of its package."""
    path = Path(getattr(module, "__file__", None) or "")
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path] if path.is_file() else []
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def _is_builtin(value: str) -> bool:
    return value.split(":")[0].split(".")[0] == BUILTIN_PACKAGE


def _env_paths() -> list[str]:
    value = os.environ.get("DPOBENCH_PLUGINS_DIR", "")
    return [p for p in value.split(os.pathsep) if p]


def _plugin_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.py") if not p.name.startswith("_")))
        elif path.is_file() and path.suffix == ".py":
            files.append(path)
        else:
            raise FileNotFoundError(f"plugins path {str(path)!r} is neither a directory nor a .py file")
    return files


def _import_file(path: Path) -> ModuleType:
    module_name = f"dpobench_local_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _add(state: Plugins, obj: Any, info: PluginInfo) -> None:
    if info.name in state.info:
        other = state.info[info.name]
        # a loose file is named by its stem: one named like a built-in module (dpo.py) or like another file
        fix = "; rename the file" if Path(info.source).suffix == ".py" else ""
        state.errors.append(
            f"plugin {info.name!r} ({info.source}) has the same name as plugin {other.name!r} ({other.source}); "
            f"it was not loaded{fix}"
        )
        return
    unmarked = [h for h in HOOKS if callable(getattr(obj, h, None)) and not _is_marked(getattr(obj, h))]
    if unmarked:
        state.errors.append(
            f"plugin {info.name!r}: function {unmarked[0]!r} is not decorated with @dpobench.hookimpl, "
            "so dpobench would never call it"
        )
        return
    try:
        state.pm.register(obj, name=info.name)
    except pluggy.PluginValidationError as err:
        state.errors.append(f"plugin {info.name!r}: {_one_line(err)}")
        return
    if not state.pm.get_hookcallers(obj):
        state.errors.append(
            f"plugin {info.name!r} implements no dpobench hook: define `register_losses(register)` "
            "decorated with @dpobench.hookimpl"
        )
        state.pm.unregister(obj)
        return
    state.info[info.name] = info


def _is_marked(function: Any) -> bool:
    return hasattr(function, f"{ENTRY_POINT_GROUP}_impl")


def _check_pending(state: Plugins) -> None:
    """``pm.check_pending()``, turned into one error per plugin with a hook dpobench does not have."""
    while True:
        try:
            state.pm.check_pending()
            return
        except pluggy.PluginValidationError as err:
            name = state.pm.get_name(err.plugin) or repr(err.plugin)
            unknown = next(
                (
                    hook
                    for hook, caller in vars(state.pm.hook).items()
                    if not caller.has_spec() and any(i.plugin is err.plugin for i in caller.get_hookimpls())
                ),
                "?",
            )
            state.errors.append(
                f"plugin {name!r} implements hook {unknown!r}, which dpobench does not define "
                f"(hooks: {', '.join(HOOKS)})"
            )
            state.pm.unregister(err.plugin)
            state.info.pop(name, None)


def _fill_registry(state: Plugins) -> None:
    impls = state.pm.hook.register_losses.get_hookimpls()
    order = {name: i for i, name in enumerate(state.info)}
    for impl in sorted(impls, key=lambda i: order.get(i.plugin_name, len(order))):
        info = state.info.get(impl.plugin_name) or PluginInfo(impl.plugin_name, "unknown", "unknown")
        try:
            impl.function(register=_Register(state, info))
        except Exception as err:
            state.registry.remove_plugin(info.name)
            state.errors.append(f"plugin {info.name!r}: register_losses raised {_one_line(err)}")


class _Register:
    """The ``register`` callback one plugin receives: records provenance, reports bad registrations."""

    def __init__(self, state: Plugins, info: PluginInfo) -> None:
        self._state, self._info = state, info

    def __call__(self, cls: type[PreferenceLoss], name: str | None = None, **defaults: Any) -> None:
        try:
            self._state.registry.add(cls, name=name, plugin=self._info.name, version=self._info.version, **defaults)
        except RegistrationError as err:
            self._state.errors.append(str(err))


# --- the process-wide view used by dpobench.get_losses() and the CLI ---

_cache: dict[tuple[Any, ...], Plugins] = {}
_extra: dict[str, Any] = {}


def state(paths: Sequence[str | os.PathLike[str]] = ()) -> Plugins:
    """The loaded plugins for the current environment, cached until it changes."""
    key = (
        os.environ.get("DPOBENCH_LOAD_PLUGINS"),
        os.environ.get("DPOBENCH_PLUGINS_DIR"),
        tuple(str(p) for p in paths),
        tuple((name, id(obj)) for name, obj in _extra.items()),
    )
    if key not in _cache:
        loaded = load_plugins(paths, extra=dict(_extra))
        for message in loaded.errors:
            warnings.warn(message, PluginWarning, stacklevel=3)
        _cache[key] = loaded
    return _cache[key]


def reset() -> None:
    """Forget the loaded plugins; the next call loads them again."""
    _cache.clear()


def get_losses(paths: Sequence[str | os.PathLike[str]] = ()) -> Registry:
    """Every registered variant, ``{name: LossSpec}`` sorted by name."""
    return state(paths).registry


def get_loss(name: str, **params: Any) -> PreferenceLoss:
    """A fresh, validated loss object of variant ``name`` with ``params`` overriding its defaults."""
    spec: LossSpec = get_losses()[name]
    return spec.build(**params)


def plugin_errors(paths: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """One line per plugin that failed to load or register."""
    return list(state(paths).errors)


@contextmanager
def temporary_plugin(obj: Any, name: str) -> Iterator[Plugins]:
    """Register ``obj`` (a module, class or instance with hook implementations) for the ``with`` block."""
    _extra[name] = obj
    reset()
    try:
        yield state()
    finally:
        _extra.pop(name, None)
        reset()
