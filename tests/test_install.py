"""`pip install .` (not editable) gives every built-in; a third-party package is found by its entry point.

Both build real wheels with pip into a temporary --target directory (a few seconds each).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, subprocess_env
from .test_plugins import BUILTIN_MODULES, EXPECTED_VARIANTS

EXAMPLE = ROOT / "docs" / "example-plugin"


def pip_install_target(source: Path, target: Path) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", "--target"]
    result = subprocess.run([*command, str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def run_dpobench(args: list[str], cwd: Path, **env: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dpobench", *args], capture_output=True, text=True, cwd=cwd, env=subprocess_env(**env),
        timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_non_editable_install_has_every_builtin(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip_install_target(ROOT, target)
    assert (target / "dpobench_plugins" / "dpo.py").is_file() and (target / "dpobench" / "py.typed").is_file()
    probe = (
        "import json, dpobench, dpobench_plugins; "
        "print(json.dumps([dpobench.__file__, dpobench_plugins.__file__, sorted(dpobench.get_losses()), "
        "sorted({s.plugin for s in dpobench.get_losses().values()})]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
        env=subprocess_env(PYTHONPATH=str(target)), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    core, builtins, names, plugins = json.loads(result.stdout)
    assert core.startswith(str(target)) and builtins.startswith(str(target))  # not the checkout
    assert set(names) == EXPECTED_VARIANTS
    assert plugins == sorted(BUILTIN_MODULES)


@pytest.mark.slow
def test_third_party_package_is_listed_and_checked(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip_install_target(EXAMPLE, target)
    listed = run_dpobench(
        ["list"], tmp_path, PYTHONPATH=str(target), DPOBENCH_LOAD_PLUGINS="dpobench-example", COLUMNS="200"
    )
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "offset_dpo" in line)
    # the version: the distribution's, and the hash of the module's source (an editable install's edits change it)
    source = (EXAMPLE / "dpobench_example.py").read_bytes()
    code = hashlib.sha256(b"dpobench_example.py\0" + source).hexdigest()[:12]
    assert re.search(rf"offset_dpo\s*│\s*example\s*│\s*0\.1\.0\+src-{code}\s*│\s*no\s*│\s*arXiv:2402\.10571", row), row
    # With DPOBENCH_LOAD_PLUGINS unset, as on a user's machine, every installed plugin loads.
    checked = run_dpobench(["check", "offset_dpo"], tmp_path, PYTHONPATH=str(target), DPOBENCH_LOAD_PLUGINS=None)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 of 1 variants pass the loss contract" in checked.stdout
    # Filtered out, it is gone; the built-ins stay.
    hermetic = run_dpobench(["list"], tmp_path, PYTHONPATH=str(target), DPOBENCH_LOAD_PLUGINS="")
    assert "offset_dpo" not in hermetic.stdout and "simpo_trl" in hermetic.stdout


def test_readme_shows_the_example_package_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("pyproject.toml", "dpobench_example.py"):
        block = re.search(rf"<!-- file: docs/example-plugin/{re.escape(name)} -->\n```\w*\n(.*?)```", readme, re.S)
        assert block, f"README.md does not show docs/example-plugin/{name}"
        assert block.group(1) == (EXAMPLE / name).read_text()
