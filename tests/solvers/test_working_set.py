"""WorkingSet (column generation + dense interior point) against HiGHS and cvxpy on
non-degenerate instances; status honesty (SOLVED only within the stated tolerances)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxens
from jaxens.solvers.instances import LinearProgram, QuadraticProgram
from jaxens.solvers.ipm import dense_qp_ipm
from jaxens.solvers.solution import Status
from jaxens.solvers.working_set import WorkingSet

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from instances import gaussian, log_softmax, refuse_degenerate  # noqa: E402

linprog = pytest.importorskip("scipy.optimize").linprog


def _highs(A, m, c, mask=None):
    v = A.shape[0]
    bounds = [(0, None if (mask is None or mask[j]) else 0) for j in range(v)]
    r = linprog(c, A_eq=np.concatenate([A, np.ones((v, 1))], 1).T, b_eq=np.concatenate([m, [1.0]]),
                bounds=bounds, method="highs")
    assert r.status == 0
    return r.fun


def _solve(problem, c, m, mask, solver=WorkingSet()):
    fn = jax.jit(jax.vmap(lambda P, ci, mi, ki: solver.solve(P, LinearProgram(ci, ki, mi)), in_axes=(None, 0, 0, 0)))
    return fn(problem, c, m, mask)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.x64)])
def test_lp_matches_highs_and_status_is_honest(dtype):
    """Every SOLVED row is within the stated tolerances of HiGHS's optimum (violations: 0)."""
    inst = gaussian(768, 3, 16, 6, seed=3)
    refuse_degenerate(inst.delta, inst.name)
    problem = jaxens.make_problem([jnp.asarray(W, dtype) for W in inst.Ws], hard="all", dtype=dtype)
    M = inst.moments()
    mask = np.ones(inst.c.shape, bool)
    mask[:, :40] = False  # masked tokens stay at zero
    sol, S = _solve(problem, jnp.asarray(inst.c, dtype), jnp.asarray(M, dtype), jnp.asarray(mask))
    solver = WorkingSet()
    tol, tol_res = solver.tolerances(dtype)
    P = np.asarray(sol.p, np.float64)
    assert np.all(P[:, :40] == 0) and np.allclose(P.sum(1), 1, atol=1e-5)
    status = np.asarray(sol.status)
    assert np.mean(status == Status.SOLVED) >= 5 / 6, status
    violations = 0
    for b in range(len(P)):
        ref = _highs(inst.A, M[b], inst.c[b], mask[b])
        rel = (inst.c[b] @ P[b] - ref) / (1 + abs(ref))
        res = np.abs(inst.A.T @ P[b] - M[b]).max()
        if status[b] == Status.SOLVED:
            # the certified gap bounds the true one (up to the rounding of the certificate)
            slack = 1e-6 if dtype == jnp.float32 else 1e-10
            violations += int(rel > tol + slack or res > (tol_res + slack) * max(1, np.abs(M[b]).max()) * 10)
            assert rel <= float(sol.gap[b]) + slack
        assert rel >= -(1e-5 if dtype == jnp.float32 else 1e-9)  # never better than the optimum
    assert violations == 0
    # warm start: the final working sets reproduce the answers
    fn = jax.jit(jax.vmap(lambda P_, ci, mi, ki, w: solver.solve(P_, LinearProgram(ci, ki, mi), w)[0],
                          in_axes=(None, 0, 0, 0, 0)))
    again = fn(problem, jnp.asarray(inst.c, dtype), jnp.asarray(M, dtype), jnp.asarray(mask), S)
    np.testing.assert_allclose(np.asarray(again.p), P, atol=1e-4 if dtype == jnp.float32 else 1e-8)


def test_qp_and_soft_members_match_cvxpy():
    cp = pytest.importorskip("cvxpy")
    inst = gaussian(512, 3, 8, 2, seed=5)
    n = 3
    lp = log_softmax(inst.logits)
    for hard, soft, obj in (([0, 1, 2], [], "sum_sq_ce"), ([0], [1], "sum_ce")):
        problem = jaxens.make_problem([jnp.asarray(W, jnp.float32) for W in inst.Ws], hard=hard, soft=soft)
        comb = jaxens.bottleneck(problem, obj, solver=WorkingSet(), rho=1.0 if soft else None)
        _, _, sol = jax.jit(comb.combine)([jnp.asarray(inst.logits[:, i], jnp.float32) for i in range(n)], None)
        assert np.all(np.asarray(sol.status) == Status.SOLVED), np.asarray(sol.status)
        for b in range(2):
            x = cp.Variable(512, nonneg=True)
            mom = [W.T @ np.exp(lp[b, i]) for i, W in enumerate(inst.Ws)]
            cons = [cp.sum(x) == 1] + [inst.Ws[i].T @ x == mom[i] for i in hard]
            if obj == "sum_sq_ce":
                f = sum(cp.square(lp[b, i] @ x) for i in range(n)) / n
            else:
                f = -(lp[b].mean(0) @ x) + sum(0.5 * cp.sum_squares(inst.Ws[i].T @ x - mom[i]) for i in soft)
            ref = cp.Problem(cp.Minimize(f), cons)
            ref.solve(solver=cp.CLARABEL)
            x.value = np.asarray(sol.p[b], np.float64)
            assert f.value <= ref.value + 2e-4 * (1 + abs(ref.value)), (obj, b, f.value, ref.value)


def test_infeasible_row_is_never_solved_and_the_combiner_certifies_it():
    rng = np.random.default_rng(0)
    W = [rng.normal(size=(200, 6)) for _ in range(2)]
    problem = jaxens.make_problem([jnp.asarray(w, jnp.float32) for w in W], hard="all")
    m = jnp.asarray(np.concatenate([w.T @ rng.dirichlet(np.ones(200)) for w in W]) + np.r_[np.zeros(6), 5 * np.ones(6)],
                    jnp.float32)
    c = jnp.asarray(rng.exponential(size=200), jnp.float32)
    sol, _ = WorkingSet().solve(problem, LinearProgram(c, jnp.ones(200, bool), m))
    assert int(sol.status) != Status.SOLVED and np.isfinite(np.asarray(sol.p)).all()
    logits = [jnp.asarray(rng.normal(size=(1, 200)) * 3, jnp.float32), jnp.asarray(rng.normal(size=(1, 200)) * 3, jnp.float32)]
    _, _, s2 = jaxens.bottleneck(problem, "sum_ce").combine(logits, None)
    assert int(s2.status[0]) in (Status.INFEASIBLE, Status.SOLVED)  # decided, with the certificate when infeasible
    assert np.isfinite(np.asarray(s2.p)).all()


def test_nonfinite_input_reports_and_returns_a_distribution():
    inst = gaussian(256, 2, 4, 1, seed=1)
    problem = jaxens.make_problem([jnp.asarray(W, jnp.float32) for W in inst.Ws], hard="all")
    c = jnp.asarray(inst.c[0], jnp.float32).at[3].set(jnp.nan)
    sol, _ = WorkingSet().solve(problem, LinearProgram(c, jnp.ones(256, bool), jnp.asarray(inst.moments()[0], jnp.float32)))
    assert int(sol.status) == Status.NONFINITE_INPUT
    assert np.isfinite(np.asarray(sol.p)).all() and abs(float(sol.p.sum()) - 1) < 1e-5


@pytest.mark.x64
def test_vertex_gradient_matches_finite_differences():
    """d(c . p*)/dm at a non-degenerate vertex (the basic solution's derivative)."""
    inst = gaussian(300, 2, 4, 1, seed=2)
    problem = jaxens.make_problem([jnp.asarray(W, jnp.float64) for W in inst.Ws], hard="all", dtype=jnp.float64)
    c = jnp.asarray(inst.c[0])
    m0 = jnp.asarray(inst.moments()[0])
    u = jnp.asarray(np.random.default_rng(0).normal(size=m0.shape))

    def f(m):
        sol, _ = WorkingSet().solve(problem, LinearProgram(c, jnp.ones(300, bool), m))
        return sol.p @ c

    g = jax.grad(f)(m0) @ u
    h = 1e-6
    fd = (f(m0 + h * u) - f(m0 - h * u)) / (2 * h)
    assert abs(float(g)) > 1e-6
    np.testing.assert_allclose(float(g), float(fd), rtol=1e-4, atol=1e-8)


@pytest.mark.x64
def test_dense_ipm_lp_against_highs_and_its_elastic_flag():
    rng = np.random.default_rng(0)
    r, K = 20, 90
    E = rng.normal(size=(r, K))
    E[0] = 1.0
    beta = E @ rng.dirichlet(np.ones(K))
    c = rng.exponential(size=K)
    res = dense_qp_ipm(jnp.asarray(E), jnp.zeros((K, 0)), jnp.asarray(c), jnp.asarray(beta), jnp.ones(K, bool), 100.0)
    assert bool(res.converged)
    np.testing.assert_allclose(c @ np.asarray(res.x), _lp_ref(E, beta, c), rtol=1e-8)
    assert np.abs(np.asarray(res.t)).max() < 1e-10
    # beta out of reach: the elastic part stays, and says so
    bad = dense_qp_ipm(jnp.asarray(E), jnp.zeros((K, 0)), jnp.asarray(c), jnp.asarray(beta + 50 * np.eye(r)[3]),
                       jnp.ones(K, bool), 100.0)
    assert np.abs(np.asarray(bad.t)).max() > 1.0


def _lp_ref(E, beta, c):
    r = linprog(c, A_eq=E, b_eq=beta, bounds=(0, None), method="highs")
    assert r.status == 0
    return r.fun


def test_rejects_caps_and_wrong_warm_start():
    inst = gaussian(128, 2, 4, 1, seed=1)
    problem = jaxens.make_problem([jnp.asarray(W, jnp.float32) for W in inst.Ws], hard="all")
    m = jnp.asarray(inst.moments()[0], jnp.float32)
    qp = QuadraticProgram(jnp.zeros(128), jnp.zeros((128, 1)), jnp.ones(128, bool), m, jnp.zeros(2), jnp.ones(128))
    with pytest.raises(ValueError, match="caps"):
        WorkingSet().solve(problem, qp)
    with pytest.raises(ValueError, match="token ids"):
        WorkingSet().solve(problem, LinearProgram(jnp.ones(128), jnp.ones(128, bool), m), jnp.zeros((3,), jnp.int32))
