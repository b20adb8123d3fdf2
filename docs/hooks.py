"""MkDocs hook: the command-line reference in cli.md, generated from the CLI itself at build time.

cli.md holds the marker below; the hook replaces it with one section per command of the typer app
(``dpobench.cli.app``, as click sees it through ``typer.main.get_command``): its help, its usage line, and a table
of its arguments and options with exactly the text ``--help`` prints for each. Nothing is written twice, so a new
option appears in the site on the next build.
"""

from __future__ import annotations

import html
import inspect
import re
from typing import Any

import typer.main
from mkdocs.exceptions import PluginError

MARKER = "<!-- cli-reference -->"
PROG = "dpobench"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/cli.md lost its marker {MARKER}: nowhere to put the generated reference")
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    """Markdown for the group (its global options) and each of its commands, in the CLI's own order."""
    from dpobench.cli import app

    group = typer.main.get_command(app)
    root = group.make_context(PROG, [], resilient_parsing=True)
    sections = [_section(group, root, "Global options")]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        if command is None or command.hidden:
            continue
        context = command.make_context(name, [], parent=root, resilient_parsing=True)
        sections.append(_section(command, context, f"{PROG} {name}"))
    return "\n\n".join(sections) + "\n"


def _section(command: Any, context: Any, title: str) -> str:
    usage = " ".join([context.command_path, *command.collect_usage_pieces(context)])
    lines = [f"## {title}", ""]
    if command.help:
        lines += [_text(inspect.cleandoc(command.help)), ""]
    lines += ["```text", f"Usage: {usage}", "```", ""]
    rows = [p.get_help_record(context) for p in command.get_params(context) if not getattr(p, "hidden", False)]
    rows = [row for row in rows if row]
    if rows:
        lines += ["| argument or option | what it does |", "|---|---|"]
        lines += [f"| `{_cell(name)}` | {_cell(_text(help_text))} |" for name, help_text in rows]
    return "\n".join(lines)


def _text(text: str) -> str:
    """CLI help as Markdown: backquoted spans stay code; elsewhere HTML, emphasis and table characters are escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(
        part if part.startswith("`") else re.sub(r"([\\*_])", r"\\\1", html.escape(part, quote=False)) for part in parts
    )


def _cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")
