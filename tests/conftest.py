"""Hermetic tests: only the built-in plugins load, whatever else is installed beside dpobench."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["DPOBENCH_LOAD_PLUGINS"] = ""
os.environ.pop("DPOBENCH_PLUGINS_DIR", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BROKEN_PLUGINS = Path(__file__).parent / "plugins"


def subprocess_env(**extra: str | None) -> dict[str, str]:
    """The environment for a `python -m dpobench` child: hermetic unless told otherwise (None unsets); it shares
    the session's private cache, never the user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPOBENCH_") or k == "DPOBENCH_CACHE"}
    env["DPOBENCH_LOAD_PLUGINS"] = ""
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def dpobench_main(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`dpobench ARGS` through the console entry point (``cli.main``: user errors become one line on stderr and exit
    code 2), in this process: a child's imports cost ~3.5 s a call. An error that escapes ``main`` raises here, as
    it would print a traceback there. ``env`` sets variables for the call."""
    from dpobench import cli

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    argv, sys.argv = sys.argv, ["dpobench", *args]
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        sys.argv = argv
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["dpobench", *args], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Models and reference log-probs go to a per-session cache, never the user's ~/.cache/dpobench."""
    old = os.environ.get("DPOBENCH_CACHE")
    os.environ["DPOBENCH_CACHE"] = str(tmp_path_factory.mktemp("dpobench-cache"))
    yield
    if old is None:
        os.environ.pop("DPOBENCH_CACHE", None)
    else:
        os.environ["DPOBENCH_CACHE"] = old


@pytest.fixture(autouse=True)
def _fresh_plugins():
    """Every test starts with the built-ins only: `dpobench --plugins-dir` run in-process sets the variable."""
    import dpobench.plugins

    saved = {k: os.environ.get(k) for k in ("DPOBENCH_PLUGINS_DIR", "DPOBENCH_LOAD_PLUGINS")}
    dpobench.plugins.reset()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    dpobench.plugins.reset()


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama with the task's tokenizer, saved with save_pretrained: for tests
    that need a real model fast, not a trained one."""
    import torch
    from transformers import LlamaForCausalLM

    from dpobench.models import build_config
    from dpobench.task import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    folder = tmp_path_factory.mktemp("model") / "tiny-untrained"
    LlamaForCausalLM(build_config("tiny", len(tokenizer), tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
