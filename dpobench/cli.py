"""The ``dpobench`` command line: list, plugins, check, landscape."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import dpobench
from dpobench import plugins as plugin_loading
from dpobench.losses import ParamError
from dpobench.registry import LossSpec, Registry, UnknownLossError

app = typer.Typer(
    name="dpobench",
    help="Benchmark preference-optimisation losses (DPO and its family) under identical training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True)

_options: dict[str, object] = {"plugins_dir": [], "debug": False}


class CLIError(Exception):
    """An error the user can fix: printed as one line, exit code 2."""


@app.callback()
def _main(
    plugins_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--plugins-dir",
            metavar="DIR",
            help="Load loose .py plugin files from this directory (repeatable; also DPOBENCH_PLUGINS_DIR). "
            "Loading a plugin runs its code.",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"dpobench {dpobench.__version__}")
        raise typer.Exit()
    _options["plugins_dir"] = list(plugins_dir or [])
    _options["debug"] = debug


def _load(extra: list[Path] | None = None) -> plugin_loading.Plugins:
    paths = [*_options["plugins_dir"], *(extra or [])]  # type: ignore[misc]
    try:
        state = plugin_loading.load_plugins(paths)
    except FileNotFoundError as error:
        raise CLIError(str(error)) from None
    for message in state.errors:
        err.print(f"[bold red]plugin error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    if not any(info.builtin for info in state.info.values()):
        raise CLIError("no built-in variants found: dpobench is not installed; run `pip install -e .` in the checkout")
    return state


@app.command("list")
def list_variants(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show each variant's formula and parameters.")
    ] = False,
) -> None:
    """List every registered loss variant with its plugin, version and paper."""
    state = _load()
    registry = state.registry
    if verbose:
        for spec in registry.values():
            _print_verbose(spec)
    else:
        table = Table(title=f"{len(registry)} loss variants", title_justify="left")
        for column in ("variant", "plugin", "version", "ref-free"):
            table.add_column(column, overflow="fold")
        table.add_column("paper", no_wrap=True)
        for spec in registry.values():
            table.add_row(
                spec.name + (f" ({spec.preset_of} preset)" if spec.preset_of else ""),
                spec.plugin,
                spec.version,
                "yes" if spec.reference_free else "no",
                spec.paper.replace("https://arxiv.org/abs/", "arXiv:"),
            )
        out.print(table)
    if state.errors:
        raise typer.Exit(1)


def _print_verbose(spec: LossSpec) -> None:
    preset = f", preset of {spec.preset_of}" if spec.preset_of else ""
    out.print(f"[bold]{spec.name}[/]  ({spec.plugin} {spec.version}{preset})", highlight=False)
    out.print(f"  {spec.summary}", highlight=False, soft_wrap=True)
    out.print(f"  reference-free: {'yes' if spec.reference_free else 'no'}", highlight=False)
    out.print("  formula:", highlight=False)
    for line in spec.formula.splitlines():
        out.print(f"    {line}", highlight=False, soft_wrap=True)
    out.print("  parameters:", highlight=False)
    for key, param in spec.params.items():
        out.print(f"    {key} = {param.default!r}  ({param.describe()}): {param.doc}", highlight=False, soft_wrap=True)
    out.print()


@app.command("plugins")
def list_plugins() -> None:
    """List the loaded plugins, where each came from, and what each registered."""
    state = _load()
    table = Table(title=f"{len(state.info)} plugins", title_justify="left")
    for column in ("plugin", "version", "source", "variants"):
        table.add_column(column, overflow="fold")
    for info in state.info.values():
        names = [s.name for s in state.registry.values() if s.plugin == info.name]
        table.add_row(info.name, info.version, info.source, ", ".join(names))
    out.print(table)
    if state.errors:
        raise typer.Exit(1)


@app.command("check")
def check(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="Variant names or plugin .py files to check (default: every variant)."),
    ] = None,
) -> None:
    """Check variants against the loss contract (shapes, finiteness, gradients, bf16, docstring...)."""
    from dpobench.testing import check_loss

    files = [Path(t) for t in targets or [] if t.endswith(".py") or Path(t).is_file()]
    for file in files:
        if not file.is_file():
            raise CLIError(f"plugin file {str(file)!r} does not exist")
    state = _load(files)
    registry = state.registry
    failed = bool(state.errors)
    specs: list[LossSpec] = []
    for target in targets or list(registry):
        if target.endswith(".py") or Path(target).is_file():
            stem = Path(target).stem
            found = [s for s in registry.values() if s.plugin == stem]
            if not found and not any(f"plugin {stem!r}" in e for e in state.errors):
                raise CLIError(f"plugin file {target!r} registers no variant: call register(...) in register_losses")
            specs += found
        else:
            specs.append(_lookup(registry, target))
    passed = 0
    for spec in specs:
        report = check_loss(spec)
        failed |= not report.ok
        passed += report.ok
        status = "[green]ok[/]" if report.ok else "[bold red]FAIL[/]"
        out.print(f"{status}  {spec.name}  [dim]({spec.plugin} {spec.version})[/]", highlight=False)
        for result in report.results:
            if not result.ok:
                out.print(f"      ✗ {result.check}: {result.message}", highlight=False, soft_wrap=True)
    out.print(f"{passed} of {len(specs)} variants pass the loss contract", highlight=False)
    if failed:
        raise typer.Exit(1)


def _lookup(registry: Registry, name: str) -> LossSpec:
    try:
        return registry[name]
    except UnknownLossError as error:
        raise CLIError(str(error)) from None


@app.command("landscape")
def landscape_command(
    output: Annotated[Path, typer.Option("--out", "-o", help="CSV file to write.")] = Path("landscape.csv"),
    variants: Annotated[str | None, typer.Option(help="Comma-separated variants (default: all).")] = None,
    betas: Annotated[str | None, typer.Option(help="Comma-separated β values (default: logspace(-2, 0, 15)).")] = None,
    margin_min: Annotated[float, typer.Option(help="Smallest log-ratio margin, nats.")] = -20.0,
    margin_max: Annotated[float, typer.Option(help="Largest log-ratio margin, nats.")] = 20.0,
    points: Annotated[int, typer.Option(help="Number of margins on the grid.", min=2)] = 81,
    tokens: Annotated[int, typer.Option(help="Completion tokens of each response.", min=1)] = 20,
) -> None:
    """Loss, gradient weight and preference probability of every variant over margins × β (tidy CSV)."""
    import numpy as np

    from dpobench.landscape import DEFAULT_BETAS, landscape

    state = _load()
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else list(state.registry)
    specs = [_lookup(state.registry, n) for n in names]
    beta_grid = DEFAULT_BETAS if betas is None else tuple(_parse_floats(betas, "--betas"))
    if any(b <= 0 for b in beta_grid):
        raise CLIError(f"--betas {betas!r}: every β must be > 0")
    if margin_max <= margin_min:
        raise CLIError(f"--margin-max ({margin_max}) must be larger than --margin-min ({margin_min})")
    margins = tuple(float(m) for m in np.linspace(margin_min, margin_max, points))
    with out.status(f"evaluating {len(specs)} variants × {len(beta_grid)} β × {points} margins"):
        frame = landscape(specs, beta_grid, margins, tokens)
    _write_atomic_csv(frame, output)
    out.print(f"wrote {len(frame)} rows ({len(specs)} variants) to {output}", highlight=False)


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{option} {text!r}: give comma-separated numbers, e.g. 0.01,0.1,1") from None


def _write_atomic_csv(frame: object, path: Path) -> None:
    import pandas as pd

    assert isinstance(frame, pd.DataFrame)
    path = path.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except OSError as error:
        raise CLIError(f"cannot write {str(path)!r}: {error.strerror or error}; choose another --out") from None


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except (CLIError, ParamError, UnknownLossError) as error:
        if _options.get("debug"):
            raise
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
