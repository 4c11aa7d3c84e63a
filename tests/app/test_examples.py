"""The examples run end to end, each in a fresh interpreter as a user would run them.

The random-member examples run with their defaults; those that need the real checkpoints
(``smollm2-135m``, ``smollm2-tiny-64``, ``gemma3-270m``) run with small settings in the slow
suite (``pytest -m slow``).  Every example is run by some test here (checked below).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = {}  # example -> the test that runs it


def runs(script):
    def mark(f):
        RUN[script] = f.__name__
        return f

    return mark


def _run(script: str, *args: str, timeout: int = 1200) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "nan" not in re.split(r"[^a-z]+", r.stdout.lower()), r.stdout
    return r.stdout


def _statuses(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.strip().startswith(label + ":"))
    return re.findall(r"'([A-Z_]+)'", line)


@runs("quickstart.py")
def test_quickstart_runs_and_its_headline_problem_is_feasible():
    out = _run("quickstart.py")
    for name in ("logit_average", "prob_average", "kl", "sum_ce", "least_squares", "soft-kl NLL"):
        assert name in out, out
    for objective in ("kl", "sum_ce", "least_squares"):  # the all-hard problem: solved, not infeasible
        assert _statuses(out, objective) == ["SOLVED"] * 4, out
    assert _statuses(out, "disagreeing") == ["INFEASIBLE"] * 4, out
    assert _statuses(out, "kl, hard=(0,)") == ["SOLVED"] * 4, out
    grad = re.search(r"d/d log rho = \[([^\]]*)\]", out).group(1)
    assert any(abs(float(g)) > 1e-4 for g in grad.split()), out  # a gradient that is not zero


@runs("sharded_decode.py")
def test_sharded_decode_defaults_work_on_cpu():
    out = _run("sharded_decode.py", "--check", "--new-tokens", "6")
    assert "mesh {'batch': 2, 'vocab': 2, 'model': 1}" in out, out
    assert "tokens identical to the single-device decoder: True" in out, out
    assert re.search(r"SOLVED=12 MAX_ITERS=0 INFEASIBLE=0", out), out  # 2 rows x 6 steps


@pytest.mark.slow
@pytest.mark.models
@runs("sensitivity.py")
def test_sensitivity_small():
    out = _run("sensitivity.py", "--context", "32")
    assert out.count("|grad|_1=") == 6, out


@pytest.mark.slow
@pytest.mark.models
@runs("learn_weights.py")
def test_learn_weights_small():
    out = _run("learn_weights.py", "--positions", "8", "--steps", "10", "--context", "64")
    assert "learned" in out and "test NLL uniform" in out, out


@pytest.mark.slow
@pytest.mark.models
@runs("cross_tokenizer.py")
def test_cross_tokenizer_small():
    out = _run("cross_tokenizer.py", "gac", "me", "--new-tokens", "4", "--bpb-chars", "300")
    assert "--- gac" in out and "--- me" in out and "bits per byte" in out, out


@pytest.mark.slow
@pytest.mark.models
@runs("train_member.py")
def test_train_member_small(tmp_path):
    out = _run("train_member.py", "--d-model", "32", "--layers", "1", "--steps", "10", "--out", str(tmp_path / "m"))
    assert "test perplexity" in out, out


def test_every_example_is_run_by_a_test():
    assert sorted(RUN) == sorted(p.name for p in (ROOT / "examples").glob("*.py"))
