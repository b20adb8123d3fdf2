"""Two small helpers every part of dpobench uses: one-line error text and write-then-rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line, for errors that name a plugin, a cell or a file."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (a file or a folder), renamed onto ``path`` only on success,
    so that a half-written report, cache entry or model is never seen under its final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
