"""ADMM's active-set solution polishing: exact vertices / QP optima in float32 and float64.

References: HiGHS (the ``sum_ce`` LP, a unique vertex on these instances) and Clarabel through
cvxpy (the rank-3 ``sum_sq_ce`` QP).  Instances are feasible by construction (moments of a
common ``p*``) with member distributions that are not ``softmax(W_i h_i)``, so the cost varies
over the feasible set; the degenerate case (cost constant on the feasible set, every feasible
``p`` optimal) is checked separately.  Polishing is what makes float32 answers reproducible: the
same row solved alone and in a batch of 8 must agree to 1e-5.
"""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from jaxens import make_problem
from jaxens.solvers.admm import ADMM
from jaxens.solvers.instances import QuadraticProgram
from jaxens.solvers.polish import PolishStatus
from jaxens.solvers.support_adjoint import kkt_solve
from jaxens.solvers.solution import Status

V, N, D = 120, 3, 8
TOL = {"float32": 1e-5, "float64": 1e-9}


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _instance(seed):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(V, D)) / np.sqrt(D) for _ in range(N)]
    ph = np.stack([_softmax(2 * rng.normal(size=V)) for _ in range(N)])
    pstar = _softmax(2 * rng.normal(size=V))
    m = np.concatenate([W.T @ pstar for W in Ws])
    return Ws, ph, m


def _eq(Ws, m):
    A = np.concatenate(Ws, axis=1)
    return np.vstack([A.T, np.ones((1, V))]), np.concatenate([m, [1.0]])


def _highs(c, Ws, m):
    Aeq, beq = _eq(Ws, m)
    ref = linprog(c, A_eq=Aeq, b_eq=beq, bounds=(0, None), method="highs")
    assert ref.status == 0
    return ref.x


def _lp_args(Ws, ph, m, dtype):
    c = -np.log(ph).sum(0)
    return (jnp.asarray(c, dtype), jnp.zeros((V, 0), dtype), jnp.ones(V, bool), jnp.asarray(m, dtype), jnp.zeros(N, dtype))


def _qp_args(Ws, ph, m, dtype, mask):
    F = np.sqrt(2) * np.log(ph).T  # 1/2 ||F^T p||^2 = sum_i (p . log p_i)^2
    return (jnp.zeros(V, dtype), jnp.asarray(F, dtype), jnp.asarray(mask), jnp.asarray(m, dtype), jnp.zeros(N, dtype))


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    with jax.enable_x64(request.param == "float64"):
        yield jnp.dtype(request.param)


@pytest.mark.parametrize("seed", [0, 1])
def test_lp_polished_vertex_equals_highs(dtype, seed):
    Ws, ph, m = _instance(seed)
    prob = make_problem(Ws, dtype=dtype)
    sol, st = ADMM().solve(prob, QuadraticProgram(*_lp_args(Ws, ph, m, dtype)))
    assert int(st.polish) == PolishStatus.ACCEPTED
    assert int(sol.status) == Status.SOLVED
    ref = _highs(-np.log(ph).sum(0), Ws, m)
    err = np.max(np.abs(np.asarray(sol.p, np.float64) - ref))
    assert err <= TOL[dtype.name], f"{dtype.name}: max|p - p_highs| = {err:.2e}"
    # the polished point is a vertex: exact zeros off the basis, at most r free tokens
    assert int(np.sum(np.asarray(sol.p) > 0)) <= prob.rank
    assert float(sol.primal_residual) <= (1e-6 if dtype == jnp.float32 else 1e-12)


def test_qp_polished_equals_clarabel(dtype):
    Ws, ph, m = _instance(2)
    mask = np.ones(V, bool)
    mask[[3, 17, 40]] = False
    prob = make_problem(Ws, dtype=dtype)
    sol, st = ADMM().solve(prob, QuadraticProgram(*_qp_args(Ws, ph, m, dtype, mask)))
    assert int(st.polish) == PolishStatus.ACCEPTED
    assert int(sol.status) == Status.SOLVED
    L = np.log(ph).T
    Aeq, beq = _eq(Ws, m)
    x = cp.Variable(V)
    pr = cp.Problem(cp.Minimize(cp.sum_squares(L.T @ x)), [Aeq @ x == beq, x >= 0, x[~mask] == 0])
    pr.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    p = np.asarray(sol.p, np.float64)
    assert np.all(p[~mask] == 0)
    err = np.max(np.abs(p - x.value))
    # Clarabel's interior point is accurate to ~1e-8 in p: the float64 bound is looser than TOL
    assert err <= max(TOL[dtype.name], 1e-7), f"{dtype.name}: max|p - p_clarabel| = {err:.2e}"


@pytest.mark.parametrize("kind", ["lp", "qp"])
def test_float32_batch_of_one_equals_batch_of_eight(kind):
    """Reduction order changes (vmap over 8 rows vs one row) move the polished p by rounding only."""
    rows = [_instance(10 + s) for s in range(8)]
    Ws = rows[0][0]
    prob = make_problem(Ws, dtype=jnp.float32)
    mask = np.ones(V, bool)
    rng = np.random.default_rng(0)
    ms, cs, Fs = [], [], []
    for _, ph, _ in rows:
        pstar = _softmax(2 * rng.normal(size=V))
        ms.append(np.concatenate([W.T @ pstar for W in Ws]))
        args = _lp_args(Ws, ph, ms[-1], jnp.float32) if kind == "lp" else _qp_args(Ws, ph, ms[-1], jnp.float32, mask)
        cs.append(args[0])
        Fs.append(args[1])
    m, c, F = jnp.asarray(np.stack(ms), jnp.float32), jnp.stack(cs), jnp.stack(Fs)
    solve = lambda c, F, m: ADMM().solve(prob, QuadraticProgram(c, F, jnp.asarray(mask), m, jnp.zeros(N)))  # noqa: E731
    sol8, st8 = jax.jit(jax.vmap(solve))(c, F, m)
    one = jax.jit(solve)
    res1 = [one(c[b], F[b], m[b]) for b in range(8)]
    p1 = np.stack([np.asarray(s.p) for s, _ in res1])
    ok = (np.asarray(st8.polish) == PolishStatus.ACCEPTED) & np.array([int(st.polish) == PolishStatus.ACCEPTED for _, st in res1])
    # a rejected polish (possible when the guessed active set is several tokens off) would keep
    # ADMM's ~1e-3 accuracy; on these rows every polish is accepted, in both runs
    assert ok.all(), np.asarray(st8.polish)
    print(f"POLISH {kind}: accepted {int(ok.sum())}/8, batch of 1 vs 8 max|dp| = {np.max(np.abs(p1 - np.asarray(sol8.p))):.2e}")
    err = np.max(np.abs(p1 - np.asarray(sol8.p))[ok])
    assert err <= 1e-5, f"{kind}: batch of 1 vs batch of 8 differ by {err:.2e}"


def test_degenerate_constant_cost_is_not_broken():
    """Exact logits ``W h`` with all members hard: the LP cost is constant on the feasible set (a face
    of optima, not a vertex).  Polishing may pick another point of the face (or skip); the answer
    must stay feasible, optimal and a distribution, in both precisions."""
    rng = np.random.default_rng(5)
    Ws = [rng.normal(size=(V, D)) / np.sqrt(D) for _ in range(N)]
    pstar = _softmax(2 * rng.normal(size=V))
    m = np.concatenate([W.T @ pstar for W in Ws])
    hs = [rng.normal(size=D) for _ in Ws]
    c = -sum(W @ h for W, h in zip(Ws, hs))  # c^T p = -sum_i h_i^T m_i on the feasible set
    const = float(c @ pstar)
    for dt in (jnp.float32, jnp.float64):
        with jax.enable_x64(dt == jnp.float64):
            prob = make_problem(Ws, dtype=dt)
            args = (jnp.asarray(c, dt), jnp.zeros((V, 0), dt), jnp.ones(V, bool), jnp.asarray(m, dt), jnp.zeros(N, dt))
            sol, st = ADMM().solve(prob, QuadraticProgram(*args))
            p = np.asarray(sol.p, np.float64)
            assert int(sol.status) == Status.SOLVED
            assert int(st.polish) in (PolishStatus.ACCEPTED, PolishStatus.SKIPPED, PolishStatus.REJECTED)
            assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-5
            Aeq, beq = _eq(Ws, m)
            assert np.max(np.abs(Aeq @ p - beq)) <= 1e-5
            assert abs(c @ p - const) <= 1e-4 * max(1.0, abs(const))


def test_polish_status_cap_and_switch():
    with jax.enable_x64(True):
        Ws, ph, m = _instance(0)
        prob = make_problem(Ws, dtype=jnp.float64)
        args = _lp_args(Ws, ph, m, jnp.float64)
        off, st_off = ADMM(polish=False).solve(prob, QuadraticProgram(*args))
        assert int(st_off.polish) == PolishStatus.NOT_RUN
        capped, st_cap = ADMM(polish_cap=2).solve(prob, QuadraticProgram(*args))
        assert int(st_cap.polish) == PolishStatus.SKIPPED
        np.testing.assert_array_equal(np.asarray(capped.p), np.asarray(off.p))
        on, st_on = ADMM().solve(prob, QuadraticProgram(*args))
        assert int(st_on.polish) == PolishStatus.ACCEPTED
        # without polishing the iterate is only as accurate as ADMM's tolerances
        ref = _highs(-np.log(ph).sum(0), Ws, m)
        assert np.max(np.abs(np.asarray(on.p) - ref)) <= np.max(np.abs(np.asarray(off.p) - ref)) + 1e-12


def test_kkt_solve_matches_dense_solve():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        K, r, k = 9, 5, 2
        U, g, E, e = rng.normal(size=(K, k)), rng.normal(size=K), rng.normal(size=(K, r)), rng.normal(size=r)
        valid = np.ones(K)
        valid[[2, 7]] = 0.0  # padded slots are pinned to 0
        x, nu = kkt_solve(*(jnp.asarray(a) for a in (U, g, E, e, valid)), 1e-10, 3)
        Uv, Ev = U * valid[:, None], E * valid[:, None]
        M = np.block([[Uv @ Uv.T + np.diag(1 - valid), Ev], [Ev.T, np.zeros((r, r))]])
        ref = np.linalg.solve(M, np.concatenate([-g * valid, e]))
        np.testing.assert_allclose(np.concatenate([x, nu]), ref, atol=1e-10)
        assert np.all(np.asarray(x)[valid == 0] == 0)
        # a singular (face) system that is consistent still gets an exact solution
        E2 = E[:4].copy()  # 4 free tokens, 5 constraints of which two coincide: M is singular
        E2[:, -1] = E2[:, 0]
        e2 = e.copy()
        e2[-1] = e2[0]
        g = g[:4]
        x2, nu2 = kkt_solve(jnp.zeros((4, 0)), jnp.asarray(g), jnp.asarray(E2), jnp.asarray(e2), jnp.ones(4), 1e-10, 2)
        np.testing.assert_allclose(E2.T @ np.asarray(x2), e2, atol=1e-9)
        np.testing.assert_allclose(np.asarray(g) + E2 @ np.asarray(nu2), 0.0, atol=1e-9)
