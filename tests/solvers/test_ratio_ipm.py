"""RatioIPM (interior point + crossover, min-underestimation LP) against HiGHS.

Tolerances: float64 ``SOLVED`` rows agree with HiGHS to ``1e-9`` relative (the solver's ``tol``)
plus ``1e-10`` rounding; float32 rows to the float32 ``tol`` (``5e-5``) plus ``1e-5`` (the returned
``p`` is feasible to ``~1e-6``, which moves ``s(p) = max p / r`` by about ``1e-5`` relative).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog

from jaxens import make_problem
from jaxens.solvers.instances import RatioProgram
from jaxens.solvers.ratio_ipm import RatioIPM
from jaxens.solvers.solution import Status

pytestmark = pytest.mark.x64

SLACK = {jnp.float32: 1e-5, jnp.float64: 1e-10}


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _instance(seed, v=160, n=3, d=10, feasible=True):
    """Gaussian ``W_i``; ``r = min_i p_i`` of random member distributions; ``m`` the moments of
    one common random ``p*`` (feasible, non-degenerate) or of each member's own ``p_i``."""
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(n)]
    ph = np.stack([_softmax(2 * rng.normal(size=v)) for _ in range(n)])
    pstar = _softmax(2 * rng.normal(size=v))
    m = np.concatenate([W.T @ (pstar if feasible else ph[i]) for i, W in enumerate(Ws)])
    r = ph.min(0) / ph.min(0).max()
    return Ws, r, m


def _highs(A, m, r, mask):
    """min s  s.t.  A^T p = m, 1^T p = 1, 0 <= p <= s r, p = 0 off the mask (HiGHS)."""
    v, D = A.shape
    Aeq = sp.csr_matrix(np.hstack([np.vstack([A.T, np.ones((1, v))]), np.zeros((D + 1, 1))]))
    A_ub = sp.hstack([sp.eye(v), sp.csr_matrix(-r[:, None])]).tocsr()
    bounds = [(0, None if ok else 0) for ok in mask] + [(0, None)]
    cost = np.zeros(v + 1)
    cost[-1] = 1.0
    return linprog(cost, A_ub=A_ub, b_ub=np.zeros(v), A_eq=Aeq, b_eq=np.concatenate([m, [1.0]]),
                   bounds=bounds, method="highs")


def _solve(solver, Ws, r, m, mask, dtype):
    prob = make_problem(Ws, dtype=dtype)
    sol, warm = solver.solve(prob, RatioProgram(jnp.asarray(r, dtype), jnp.asarray(mask), jnp.asarray(m, dtype)))
    assert warm is None
    return prob, sol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vs_highs(dtype, seed):
    Ws, r, m = _instance(seed)
    v = r.shape[0]
    mask = np.ones(v, bool)
    if seed % 2:
        mask[np.random.default_rng(seed).choice(v, 12, replace=False)] = False
    solver = RatioIPM()
    prob, sol = _solve(solver, Ws, r, m, mask, dtype)
    ref = _highs(np.concatenate(Ws, axis=1), m, r, mask)
    assert ref.status == 0
    tol, res_tol = solver.tolerances(dtype)
    p = np.asarray(sol.p, np.float64)
    assert int(sol.status) == Status.SOLVED, (int(sol.status), float(sol.gap))
    assert np.all(p >= 0) and abs(p.sum() - 1) < (1e-6 if dtype == jnp.float32 else 1e-12)
    assert np.all(p[~mask] == 0)
    s = float(np.max(p / r))
    assert float(sol.gap) <= tol
    assert abs(s - ref.fun) / ref.fun <= tol + SLACK[dtype], (s, ref.fun)
    Q = np.asarray(prob.Q, np.float64)
    beta = np.asarray(prob.beta(jnp.asarray(m, dtype)), np.float64)
    assert np.max(np.abs(Q.T @ p - beta)) <= res_tol + SLACK[dtype]
    assert float(sol.primal_residual) <= (1e-5 if dtype == jnp.float32 else 1e-9)
    assert 0 < int(sol.iterations) < solver.max_iters


def test_vmap_jit_batch_matches_rows():
    rows = [_instance(s, v=96, n=2, d=8) for s in (4, 5, 6)]
    Ws = rows[0][0]
    prob = make_problem(Ws, dtype=jnp.float64)
    R = jnp.asarray(np.stack([r for _, r, _ in rows]))
    rng = np.random.default_rng(9)
    P = np.stack([_softmax(2 * rng.normal(size=96)) for _ in rows])
    M = jnp.asarray(np.stack([np.concatenate([W.T @ p for W in Ws]) for p in P]))  # feasible under Ws
    mask = jnp.ones((3, 96), bool)
    solver = RatioIPM()
    batched = jax.jit(jax.vmap(lambda r, mk, m: solver.solve(prob, RatioProgram(r, mk, m))[0]))(R, mask, M)
    for b in range(3):
        one = solver.solve(prob, RatioProgram(R[b], mask[b], M[b]))[0]
        assert int(batched.status[b]) == int(one.status) == Status.SOLVED
        np.testing.assert_allclose(np.asarray(batched.p[b]), np.asarray(one.p), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_infeasible_instance_is_never_solved_and_the_combiner_says_infeasible(dtype):
    """Directly: never SOLVED (INFEASIBLE only with a valid certificate, from the IPM's dual ray);
    through the combiner (its least-squares phase): INFEASIBLE with a Farkas certificate."""
    from jaxens.combiners.bottleneck import bottleneck

    v = 40
    Ws, r, m = _instance(7, v=v, n=3, d=10, feasible=False)
    A = np.concatenate(Ws, axis=1)
    ref = linprog(np.zeros(v), A_eq=np.vstack([A.T, np.ones((1, v))]), b_eq=np.concatenate([m, [1.0]]),
                  bounds=(0, None), method="highs")
    assert ref.status == 2  # HiGHS: infeasible
    _, sol = _solve(RatioIPM(), Ws, r, m, np.ones(v, bool), dtype)
    assert int(sol.status) in (Status.INFEASIBLE, Status.MAX_ITERS)
    if int(sol.status) == Status.INFEASIBLE:
        d = np.asarray(sol.certificate, np.float64)
        assert d @ m - np.max(A @ d) > 0
    p = np.asarray(sol.p)
    assert np.all(np.isfinite(p)) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-5
    # the combiner: member logits whose moments disagree (the same row as above, from logits)
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(3, v)) * 2.0, dtype)
    prob = make_problem(Ws, dtype=dtype)
    comb = bottleneck(prob, "min_underestimation")  # default solver: RatioIPM (test_protocol)
    _, _, csol = comb.combine([logits[i][None] for i in range(3)], comb.init(1))
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float64), axis=-1))
    mm = np.concatenate([W.T @ probs[i] for i, W in enumerate(Ws)])
    ref = linprog(np.zeros(v), A_eq=np.vstack([A.T, np.ones((1, v))]), b_eq=np.concatenate([mm, [1.0]]),
                  bounds=(0, None), method="highs")
    assert ref.status == 2
    assert int(csol.status[0]) == Status.INFEASIBLE
    d = np.asarray(csol.certificate[0], np.float64)
    assert d @ mm - np.max(A @ d) > 0


def test_max_iters_reports_the_certified_gap():
    Ws, r, m = _instance(0)
    prob, sol = _solve(RatioIPM(max_iters=2), Ws, r, m, np.ones(r.shape[0], bool), jnp.float64)
    assert int(sol.status) == Status.MAX_ITERS
    tol, res_tol = RatioIPM().tolerances(jnp.float64)
    res = float(jnp.max(jnp.abs(prob.Q.T @ sol.p - prob.beta(jnp.asarray(m)))))
    # not certified: a gap above tol, or (negative gap) a p that is not yet feasible
    assert np.isfinite(float(sol.gap)) and (float(sol.gap) > tol or res > res_tol)
    p = np.asarray(sol.p)
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-12


def test_nonfinite_input():
    Ws, r, m = _instance(1)
    r = r.copy()
    r[3] = np.nan
    _, sol = _solve(RatioIPM(), Ws, r, m, np.ones(r.shape[0], bool), jnp.float64)
    assert int(sol.status) == Status.NONFINITE_INPUT
    np.testing.assert_allclose(np.asarray(sol.p), 1.0 / r.shape[0])


def test_settings_are_checked():
    from jaxens.solvers.adjoint import UnrolledAdjoint

    with pytest.raises(TypeError, match="ImplicitAdjoint"):
        RatioIPM(adjoint=UnrolledAdjoint())
    with pytest.raises(ValueError, match="step_fraction"):
        RatioIPM(step_fraction=1.0)
    with pytest.raises(ValueError, match="tol > 0"):
        RatioIPM(tol=0.0)
    assert RatioIPM().tolerances(jnp.float32) == (5e-5, 1e-6)


def test_basis_gradient_finite_differences():
    """d(a.p)/d(r, m) through the basis adjoint at the IPM's vertex vs central differences (float64)."""
    Ws, r, m = _instance(2, v=80, n=2, d=8)
    prob = make_problem(Ws, dtype=jnp.float64)
    mask = jnp.ones(80, bool)
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.normal(size=80))
    solver = RatioIPM()

    def f(r_, m_):
        return a @ solver.solve(prob, RatioProgram(r_, mask, m_))[0].p

    rj, mj = jnp.asarray(r), jnp.asarray(m)
    assert int(solver.solve(prob, RatioProgram(rj, mask, mj))[0].status) == Status.SOLVED
    gr, gm = jax.grad(f, argnums=(0, 1))(rj, mj)
    dr = rng.normal(size=80) * r * 0.1
    dm = rng.normal(size=m.shape) * 0.01
    e = 1e-5  # the vertex is piecewise linear: a step that keeps the basis is exact
    fd = (float(f(rj + e * dr, mj + e * dm)) - float(f(rj - e * dr, mj - e * dm))) / (2 * e)
    an = float(np.asarray(gr) @ dr + np.asarray(gm) @ dm)
    assert abs(an - fd) <= 1e-7 + 1e-5 * abs(fd), (an, fd)
