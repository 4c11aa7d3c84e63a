"""Least-squares phase and Farkas certificate vs HiGHS (feasibility) and Clarabel (LS value)."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxens import make_problem
from jaxens.solvers.least_squares import default_ls_solver, least_squares
from jaxens.solvers.solution import Status


pytestmark = pytest.mark.x64


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _instance(seed, feasible, v=150, n=3, d=16, duplicate=False):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(n)]
    if duplicate:
        Ws[1] = Ws[0].copy()
    if feasible:
        pstar = _softmax(2 * rng.normal(size=v))
        m = np.concatenate([W.T @ pstar for W in Ws])
    else:  # each member's own distribution: no common p when n*d is close to v
        m = np.concatenate([W.T @ _softmax(2 * rng.normal(size=v)) for W in Ws])
    return Ws, m


def _highs_feasible(A, m, mask):
    v = A.shape[0]
    res = linprog(
        np.zeros(v), A_eq=np.vstack([A.T, np.ones((1, v))]), b_eq=np.concatenate([m, [1.0]]),
        bounds=[(0, None if k else 0) for k in mask], method="highs",
    )
    assert res.status in (0, 2)
    return res.status == 0


def _ls_reference(A, m, mask):
    p = cp.Variable(A.shape[0])
    pr = cp.Problem(cp.Minimize(cp.sum_squares(A.T @ p - m)), [p >= 0, cp.sum(p) == 1, p[~mask] == 0])
    pr.solve(solver="CLARABEL")
    return pr.value


CASES = [(s, True, False) for s in range(3)] + [(s, False, False) for s in range(3)] + [(7, False, True)]


@pytest.mark.parametrize("ls_solver", ["default", "fista"])  # default: MinNormPoint (no caps)
@pytest.mark.parametrize("seed,feasible,duplicate", CASES)
def test_verdict_certificate_and_value(seed, feasible, duplicate, ls_solver):
    Ws, m = _instance(seed, feasible, duplicate=duplicate)
    A = np.concatenate(Ws, axis=1)
    v = A.shape[0]
    mask = np.ones(v, bool)
    mask[np.random.default_rng(seed).choice(v, 10, replace=False)] = False
    if feasible:  # keep p* on the mask
        mask[:] = True
    prob = make_problem(Ws, dtype=jnp.float64)
    solver = None if ls_solver == "default" else default_ls_solver(jnp.float64)
    sol = least_squares(prob, jnp.asarray(m), jnp.asarray(mask), solver)
    ref_feasible = _highs_feasible(A, m, mask)
    assert ref_feasible == feasible or duplicate
    assert (int(sol.status) == Status.INFEASIBLE) == (not ref_feasible)
    assert int(sol.status) in (Status.SOLVED, Status.INFEASIBLE)
    p = np.asarray(sol.p)
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-10 and np.all(p[~mask] == 0)
    ls = float(np.sum((A.T @ p - m) ** 2))
    ref = _ls_reference(A, m, mask)
    assert ls <= ref + 1e-4 * max(ref, 1e-8) + 1e-10
    if not ref_feasible:
        d = np.asarray(sol.certificate, np.float64)
        margin = d @ m - np.max((A @ d)[mask])  # evaluated independently in float64
        assert margin > 0
        np.testing.assert_allclose(margin, float(sol.certificate_margin), rtol=1e-6)
        np.testing.assert_allclose(margin, np.sqrt(ref), rtol=1e-3)  # strong duality
    else:
        assert float(sol.certificate_margin) <= 1e-9
        assert float(sol.primal_residual) < 1e-4


@pytest.mark.parametrize("ls_solver", ["default", "fista"])
def test_float32_batched_verdicts(ls_solver):
    cases = [_instance(s, s % 2 == 0) for s in range(4)]
    Ws = cases[0][0]
    rng = np.random.default_rng(0)
    ms = []
    for s in range(4):
        if s % 2 == 0:
            pstar = _softmax(2 * rng.normal(size=150))
            ms.append(np.concatenate([W.T @ pstar for W in Ws]))
        else:
            ms.append(np.concatenate([W.T @ _softmax(2 * rng.normal(size=150)) for W in Ws]))
    A = np.concatenate(Ws, axis=1)
    ref = [_highs_feasible(A, m, np.ones(150, bool)) for m in ms]
    prob = make_problem(Ws, dtype=jnp.float32)
    mask = jnp.ones((4, 150), bool)
    solver = None if ls_solver == "default" else default_ls_solver(jnp.float32)
    sol = jax.vmap(lambda m, k: least_squares(prob, m, k, solver))(jnp.asarray(np.stack(ms), jnp.float32), mask)
    got = np.asarray(sol.status) == Status.INFEASIBLE
    np.testing.assert_array_equal(got, ~np.array(ref))
