"""Writing a directory atomically: assemble it beside its destination, then move it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, prefix: str | None = None,
                     file_mode: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out`` to fill.

    On a normal exit the directory gets mode ``0o755`` (its files ``file_mode`` when given) and
    replaces ``out`` (an existing ``out`` is removed first); on an exception it is deleted and
    ``out`` is left as it was.  ``prefix``: the temporary name's prefix (default ``.<name>-``).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix if prefix is not None else f".{out.name}-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if file_mode is not None:
            for f in tmp.iterdir():
                os.chmod(f, file_mode)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
