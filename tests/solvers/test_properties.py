"""Property-based tests of the bottleneck combiner's numerical contract (docs/numerics.md).

Hypothesis draws random ensembles and rows from the generators of ``benchmarks/robustness.py``:
full-rank, ``n d >= v`` and duplicated / rank-deficient unembeddings; members that agree
exactly, disjoint supports, ``-inf`` masks, ``|logits| ~ 1e4``, common offsets of ``1e4``, NaN /
``+inf`` rows; float32 and float64 problems and bfloat16 logits as input.  Every objective runs
through the combiner with its default solver, and every row must satisfy:

* ``p`` is a distribution (finite, ``>= 0``, sums to one within ``SUM_TOL``), zero off the
  objective's mask;
* ``SOLVED`` => hard residual (recomputed in float64) ``<= residual_tol``;
* ``INFEASIBLE`` => the certificate's Farkas margin, recomputed in float64, is positive;
* NaN / ``+inf`` logits <=> ``NONFINITE_INPUT``;
* HiGHS cross-check: a row HiGHS finds feasible is never ``INFEASIBLE``; a row at L1 distance
  ``>= 0.05`` from feasibility is never ``SOLVED`` and is ``INFEASIBLE`` unless undecided
  (``MAX_ITERS``);
* the same input twice gives bit-identical outputs.

Shapes are fixed per (bucket, dtype) combination so that each objective compiles a handful of
times.  Profiles: ``HYPOTHESIS_PROFILE=ci`` (default, fast) or ``full``.
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import robustness as rb  # noqa: E402

from jaxens.solvers.entropic_newton import EntropicNewton  # noqa: E402
from jaxens.solvers.solution import Status  # noqa: E402

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.register_profile("full", max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
FULL = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "full"

B = 4  # rows per example (fixed: one compile per combination)
# (bucket, problem dtype, logits dtype): CI uses 3 combinations per objective, "full" all of them
COMBOS_CI = [
    (rb.BUCKETS[0], "float32", "float32"),
    (rb.BUCKETS[1], "float64", "float64"),
    (rb.BUCKETS[2], "float32", "bfloat16"),
]
COMBOS_FULL = [(b, dt, dt) for b in rb.BUCKETS[:3] for dt in ("float32", "float64")] + [
    (b, "float32", "bfloat16") for b in rb.BUCKETS[:3]
]
COMBOS = COMBOS_FULL if FULL else COMBOS_CI


pytestmark = pytest.mark.x64


@st.composite
def instances(draw):
    bucket, dtype, ldtype = draw(st.sampled_from(COMBOS))
    seed = draw(st.integers(0, 2**32 - 1))
    kinds = draw(st.lists(st.sampled_from(rb.KINDS), min_size=B, max_size=B))
    w_scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    Ws = [w_scale * W for W in rb.make_unembeddings(rng, bucket)]
    logits = np.stack([rb.make_logits(rng, Ws, k) for k in kinds])
    if ldtype == "bfloat16":  # the reference sees the rounded values
        logits = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)
    return dict(bucket=bucket, dtype=dtype, ldtype=ldtype, Ws=Ws, logits=logits, kinds=kinds)


def _run(objective, inst, solver=None):
    return rb.solve_batch(
        objective, inst["dtype"], inst["Ws"], inst["logits"], solver=solver,
        logits_dtype=jnp.bfloat16 if inst["ldtype"] == "bfloat16" else None,
    )


def _check(objective, inst, solver=None, highs=True):
    p, sol = _run(objective, inst, solver)
    newton_lp = isinstance(solver, EntropicNewton) and objective == "sum_ce"
    recs = rb.check_rows(objective, inst["dtype"], inst["Ws"], inst["logits"], p, sol, newton_lp)
    for kind, r in zip(inst["kinds"], recs):
        assert not r["errors"], (objective, inst["bucket"].name, inst["dtype"], inst["ldtype"], kind, r)
    # determinism: the same input gives bit-identical outputs
    p2, sol2 = _run(objective, inst, solver)
    np.testing.assert_array_equal(p, p2)
    for k in sol:
        np.testing.assert_array_equal(sol[k], sol2[k], err_msg=k)
    if not highs:
        return
    for b, (kind, r) in enumerate(zip(inst["kinds"], recs)):
        if r["status"] == Status.NONFINITE_INPUT:
            continue
        dist = rb.highs_l1_distance(inst["Ws"], inst["logits"][b], objective)
        if dist <= 1e-9:
            assert r["status"] != Status.INFEASIBLE, (objective, kind, dist, r)
        if dist >= 0.05:
            assert r["status"] != Status.SOLVED, (objective, kind, dist, r)
            assert r["status"] in (Status.INFEASIBLE, Status.MAX_ITERS), (objective, kind, dist, r)


@pytest.mark.parametrize("objective", rb.OBJECTIVES)
@given(inst=instances())
def test_contract_default_solver(objective, inst):
    _check(objective, inst)


@given(inst=instances())
def test_contract_sum_ce_entropic_newton(inst):
    _check("sum_ce", inst, solver=EntropicNewton(), highs=False)
