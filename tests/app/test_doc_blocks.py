"""Every Python block in the README and docs/ runs as written, each in a fresh interpreter.

A block is a fenced ``python`` code block and must be self-contained (a reader copies one block).
A block preceded by the line ``<!-- slow: REASON -->`` needs the real checkpoints (or minutes of
CPU) and runs with the slow tests (``pytest -m slow``); every other block runs in the default suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"(?P<slow><!-- slow: [^>]*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


# what a block's output must show (the feature, not just "it ran"): regexes over its stdout
SHOWS = {
    "README.md#1": [r"\['SOLVED', 'SOLVED', 'SOLVED', 'SOLVED'\]",    # the all-hard problem is feasible
                    r"\[\s*-?0\.[0-9]*[1-9]"],                          # a gradient that is not zero
    "README.md#2": [r"\['INFEASIBLE', 'INFEASIBLE', 'INFEASIBLE', 'INFEASIBLE'\]",
                    r"\['SOLVED', 'SOLVED', 'SOLVED', 'SOLVED'\]"],
    "docs/sharding.md#1": [r"\nTrue\n"],                                  # sharded == one device
    "docs/sharding.md#2": [r"\n[0-9.]+e-(0[6-9]|[1-9][0-9])\n"],          # within 1e-6 of one device
}


def _blocks(slow: bool):
    out = []
    for path in FILES:
        found = [m for m in _BLOCK.finditer(path.read_text())]
        for k, m in enumerate(found):
            if bool(m["slow"]) == slow:
                key = f"{path.relative_to(ROOT)}#{k + 1}"
                out.append(pytest.param(path, m["code"], key, id=key))
    return out


def _run(path: Path, code: str, tmp_path: Path, key: str = "") -> str:
    f = tmp_path / "block.py"
    f.write_text(code)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(f)], capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert r.returncode == 0, f"a block of {path.name} failed:\n{code}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "nan" not in re.split(r"[^a-z]+", r.stdout.lower()), r.stdout
    for pattern in SHOWS.get(key, []):
        assert re.search(pattern, r.stdout), f"{key} should print /{pattern}/, printed:\n{r.stdout}"
    return r.stdout


def test_the_readme_has_runnable_blocks():
    assert any(p.values[0].name == "README.md" for p in _blocks(False))
    keys = {p.values[2] for p in _blocks(False) + _blocks(True)}
    assert set(SHOWS) <= keys, f"SHOWS names blocks that do not exist: {set(SHOWS) - keys}"


@pytest.mark.parametrize("path,code,key", _blocks(False))
def test_block_runs_as_written(path, code, key, tmp_path):
    _run(path, code, tmp_path, key)


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.parametrize("path,code,key", _blocks(True))
def test_slow_block_runs_as_written(path, code, key, tmp_path):
    _run(path, code, tmp_path, key)
