"""ADMM vs HiGHS (LPs) and OSQP (QP) in float64 on feasible instances."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxens import make_problem
from jaxens.solvers.admm import ADMM
from jaxens.solvers.admm_ratio import ratio_prox_s
from jaxens.solvers.instances import QuadraticProgram, RatioProgram
from jaxens.solvers.solution import Status


pytestmark = pytest.mark.x64


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _instance(seed, v=120, n=3, d=10, **kw):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(n)]
    ph = np.stack([_softmax(2 * rng.normal(size=v)) for _ in range(n)])
    pstar = _softmax(2 * rng.normal(size=v))  # a common p: feasible
    m = np.concatenate([W.T @ pstar for W in Ws])
    prob = make_problem(Ws, dtype=jnp.float64, **kw)
    return prob, Ws, ph, m


SOLVER = ADMM(tol_abs=1e-9, tol_rel=1e-9, max_iters=30000)


def _eq(A, m):
    v = A.shape[0]
    return np.vstack([A.T, np.ones((1, v))]), np.concatenate([m, [1.0]])


def _check(prob, m, sol):
    p = np.asarray(sol.p)
    assert int(sol.status) in (Status.SOLVED, Status.MAX_ITERS)
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-12
    assert float(sol.primal_residual) <= 1e-5
    A = np.asarray(prob.A)
    assert np.max(np.abs(A.T @ p - m)) <= 1e-5
    return p


@pytest.mark.parametrize("seed", [0, 1])
def test_lp_sum_ce_vs_highs(seed):
    prob, Ws, ph, m = _instance(seed)
    A = np.asarray(prob.A)
    v = A.shape[0]
    c = -np.log(ph).sum(0)
    sol, st = SOLVER.solve(prob, QuadraticProgram(jnp.asarray(c), jnp.zeros((v, 0)), jnp.ones(v, bool), jnp.asarray(m), jnp.zeros(3)))
    p = _check(prob, m, sol)
    Aeq, beq = _eq(A, m)
    ref = linprog(c, A_eq=Aeq, b_eq=beq, bounds=(0, None), method="highs")
    assert ref.status == 0
    assert abs(c @ p - ref.fun) <= 1e-4 * abs(ref.fun)


def test_qp_sum_sq_ce_vs_osqp():
    prob, Ws, ph, m = _instance(2)
    A = np.asarray(prob.A)
    v = A.shape[0]
    L = np.log(ph).T  # v x n
    F = np.sqrt(2) * L  # 1/2 ||F^T p||^2 = sum_i (p . log p_i)^2
    mask = np.ones(v, bool)
    mask[[3, 17, 40]] = False
    mask_j = jnp.asarray(mask)
    sol, st = SOLVER.solve(prob, QuadraticProgram(jnp.zeros(v), jnp.asarray(F), mask_j, jnp.asarray(m), jnp.zeros(3)))
    p = np.asarray(sol.p)
    assert np.all(p[~mask] == 0)
    Aeq, beq = _eq(A, m)
    x = cp.Variable(v)
    pr = cp.Problem(cp.Minimize(cp.sum_squares(L.T @ x)), [Aeq @ x == beq, x >= 0, x[~mask] == 0])
    pr.solve(solver="OSQP", eps_abs=1e-10, eps_rel=1e-10, max_iter=200000, polishing=True)
    f = np.sum((L.T @ p) ** 2)
    _check(prob, m, sol)
    assert abs(f - pr.value) <= 1e-4 * abs(pr.value)


def test_soft_member_vs_clarabel():
    prob, Ws, ph, m = _instance(3, hard=(0,), soft=(1, 2))
    v = prob.vocab_size
    c = -np.log(ph[0])
    rho = np.array([0.0, 5.0, 2.0])
    sol, st = SOLVER.solve(prob, QuadraticProgram(jnp.asarray(c), jnp.zeros((v, 0)), jnp.ones(v, bool), jnp.asarray(m), jnp.asarray(rho)))
    p = np.asarray(sol.p)
    assert float(sol.primal_residual) <= 1e-5
    d = 10
    x = cp.Variable(v)
    obj = c @ x + sum(rho[i] / 2 * cp.sum_squares(Ws[i].T @ x - m[i * d : (i + 1) * d]) for i in (1, 2))
    pr = cp.Problem(cp.Minimize(obj), [Ws[0].T @ x == m[:d], cp.sum(x) == 1, x >= 0])
    pr.solve(solver="CLARABEL")
    f = c @ p + sum(rho[i] / 2 * np.sum((Ws[i].T @ p - m[i * d : (i + 1) * d]) ** 2) for i in (1, 2))
    assert abs(f - pr.value) <= 1e-4 * abs(pr.value)


@pytest.mark.parametrize("seed", [0, 3])
def test_min_underestimation_vs_highs(seed):
    prob, Ws, ph, m = _instance(seed)
    A = np.asarray(prob.A)
    v = A.shape[0]
    r = ph.min(0)
    sol, st = SOLVER.solve(prob, RatioProgram(jnp.asarray(r), jnp.ones(v, bool), jnp.asarray(m)))
    p = _check(prob, m, sol)
    Aeq, beq = _eq(A, m)
    cc = np.zeros(v + 1)
    cc[-1] = 1.0
    ref = linprog(
        cc, A_ub=np.hstack([np.eye(v), -r[:, None]]), b_ub=np.zeros(v),
        A_eq=np.hstack([Aeq, np.zeros((Aeq.shape[0], 1))]), b_eq=beq, bounds=(0, None), method="highs",
    )
    assert ref.status == 0
    s = float(ADMM.ratio_value(jnp.asarray(p), jnp.asarray(r)))
    assert abs(s - ref.fun) <= 1e-4 * ref.fun


def test_ratio_prox_matches_brute_force():
    rng = np.random.default_rng(0)
    a, r = rng.normal(size=30), rng.uniform(0, 1, size=30)
    r[:3] = 0.0
    for b, rho, om in [(0.3, 2.0, 1.5), (-1.0, 0.5, 0.1), (2.0, 10.0, 3.0)]:
        s = float(ratio_prox_s(jnp.asarray(a), jnp.asarray(b), jnp.asarray(r), rho, om))
        grid = np.linspace(0, 6, 600001)
        P = np.clip(a[None], 0, grid[:, None] * r[None])
        phi = om * grid + rho / 2 * (((a[None] - P) ** 2).sum(1) + (grid - b) ** 2)
        assert abs(s - grid[phi.argmin()]) < 1e-4


def test_warm_start_and_vmap():
    prob, Ws, ph, m = _instance(4)
    v = prob.vocab_size
    c = -np.log(ph).sum(0)
    solver = ADMM(tol_abs=1e-5, tol_rel=1e-5, max_iters=30000)
    args = (jnp.zeros((v, 0)), jnp.ones(v, bool), jnp.asarray(m), jnp.zeros(3))
    sol1, st1 = solver.solve(prob, QuadraticProgram(jnp.asarray(c), *args))
    assert int(sol1.status) == Status.SOLVED
    c2 = c + 0.01 * np.random.default_rng(0).normal(size=v)  # the next, nearby problem
    cold, _ = solver.solve(prob, QuadraticProgram(jnp.asarray(c2), *args))
    warm, _ = solver.solve(prob, QuadraticProgram(jnp.asarray(c2), *args), st1)
    assert int(warm.status) == Status.SOLVED
    assert int(warm.iterations) < int(cold.iterations)
    # batched: one compile, rows equal the unbatched solves
    cs = jnp.stack([jnp.asarray(c), jnp.asarray(c2)])
    f = jax.jit(jax.vmap(lambda c: solver.solve(prob, QuadraticProgram(c, *args))[0]))
    sol = f(cs)
    np.testing.assert_allclose(np.asarray(sol.p[1]), np.asarray(cold.p), atol=1e-9)
    f(cs + 1.0)
    assert f._cache_size() == 1


def _highs_ratio(A, m, r):
    v = A.shape[0]
    Aeq, beq = _eq(A, m)
    cc = np.zeros(v + 1)
    cc[-1] = 1.0
    ref = linprog(
        cc, A_ub=np.hstack([np.eye(v), -r[:, None]]), b_ub=np.zeros(v),
        A_eq=np.hstack([Aeq, np.zeros((Aeq.shape[0], 1))]), b_eq=beq, bounds=(0, None), method="highs",
    )
    assert ref.status == 0
    return ref.fun


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("solver", [ADMM(), SOLVER], ids=["default", "tight"])
def test_min_underestimation_certified_gap(dtype, solver):
    """LB <= HiGHS optimum <= s(p), and SOLVED => the gap vs HiGHS is within tol_rel."""
    for seed in (0, 1, 3):
        prob, Ws, ph, m = _instance(seed, v=160)
        prob = make_problem(Ws, dtype=dtype)
        A = np.asarray(prob.A, np.float64)
        r = ph.min(0) / ph.min(0).max()
        sol, _ = solver.solve(prob, RatioProgram(jnp.asarray(r, dtype), jnp.ones(A.shape[0], bool), jnp.asarray(m, dtype)))
        ref = _highs_ratio(A, m, r)
        s = float(np.max(np.asarray(sol.p, np.float64) / r))
        lower = s * (1.0 - float(sol.gap))
        rnd = 1e-5 if dtype == jnp.float32 else 1e-10  # rounding of LB (Q y over v terms)
        # p is feasible only to its residual (~1e-6 in float32), which moves s(p) by ~residual / r_j
        slack = 1e-4 if dtype == jnp.float32 else 1e-8
        assert np.isfinite(float(sol.gap))
        assert lower <= ref * (1 + rnd), (seed, lower, ref)
        assert ref <= s * (1 + slack), (seed, ref, s)
        if int(sol.status) == Status.SOLVED:
            assert (s - ref) / ref <= solver.tolerances(dtype)[1] + slack, (seed, s, ref)
        else:
            assert int(sol.status) == Status.MAX_ITERS
