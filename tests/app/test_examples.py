"""The examples run end to end (each in a fresh interpreter, as a user would run them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_quickstart_runs_and_reports_every_combiner():
    out = _run("quickstart.py")
    for name in ("logit_average", "prob_average", "kl", "sum_ce", "least_squares", "soft-kl NLL"):
        assert name in out, out
    # the soft-kl gradient is finite (a NaN would print as nan)
    assert "nan" not in out.lower(), out
