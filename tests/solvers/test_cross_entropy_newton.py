"""CrossEntropyNewton (cross_entropy objective) against cvxpy (Clarabel, exponential cone)."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxens.problem import make_problem
from jaxens.solvers.cross_entropy_newton import CrossEntropyNewton
from jaxens.solvers.instances import MixtureCrossEntropy
from jaxens.solvers.solution import Status


pytestmark = pytest.mark.x64


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def instance(v=60, n=3, d=4, seed=0, hard="all", soft=None, common=True, dup=False):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(v, d)) for _ in range(n)]
    if dup:
        Ws[1] = Ws[0].copy()
    phat = np.stack([_softmax(2.0 * rng.normal(size=v)) for _ in range(n)])
    pstar = rng.dirichlet(np.ones(v))
    problem = make_problem(Ws, hard=hard, soft=soft, dtype=jnp.float64)
    m = np.asarray(problem.moments(jnp.asarray(np.stack([pstar] * n) if common else phat)))
    return Ws, phat, m, problem


def objective(p, s, mask, Ws, m, soft, rho):
    offs = np.cumsum([0] + [W.shape[1] for W in Ws])
    val = -np.sum(s[mask] * np.log(p[mask]))
    return val + sum(0.5 * rho[i] * np.sum((Ws[i].T @ p - m[offs[i]:offs[i + 1]]) ** 2) for i in soft)


def cvx_reverse_ce(s, mask, Ws, m, hard, soft, rho, tight=True):
    v = s.shape[0]
    offs = np.cumsum([0] + [W.shape[1] for W in Ws])
    p = cp.Variable(v)
    obj = -s[mask] @ cp.log(p[mask])
    for i in soft:
        obj = obj + 0.5 * rho[i] * cp.sum_squares(Ws[i].T @ p - m[offs[i]:offs[i + 1]])
    cons = [cp.sum(p) == 1, p >= 0]
    for i in hard:
        cons.append(Ws[i].T @ p == m[offs[i]:offs[i + 1]])
    if not mask.all():
        cons.append(p[~mask] == 0)
    opts = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=500) if tight else {}
    cp.Problem(cp.Minimize(obj), cons).solve(solver=cp.CLARABEL, **opts)
    return np.maximum(p.value, 0.0)


def _close(ours, ref, rtol=1e-4):
    assert abs(ours - ref) <= rtol * max(abs(ref), 1.0), (ours, ref)


@pytest.mark.parametrize("masked", [False, True])
def test_hard_matches_cvxpy(masked):
    Ws, phat, m, problem = instance(seed=1)
    s = np.array([0.5, 0.3, 0.2]) @ phat
    mask = np.ones(60, bool)
    if masked:  # p* must vanish on the masked tokens for feasibility
        mask[:6] = False
        rng = np.random.default_rng(1)
        pstar = rng.dirichlet(np.ones(60))
        pstar[:6] = 0
        pstar /= pstar.sum()
        m = np.asarray(problem.moments(jnp.asarray(np.stack([pstar] * 3))))
    sol, x = CrossEntropyNewton().solve(problem, MixtureCrossEntropy(jnp.asarray(s), jnp.asarray(mask), jnp.asarray(m)))
    assert int(sol.status) == Status.SOLVED
    p = np.asarray(sol.p)
    assert float(sol.primal_residual) <= 1e-8 and abs(p.sum() - 1) < 1e-12
    assert np.all(p[~mask] == 0)
    p_ref = cvx_reverse_ce(s, mask, Ws, m, [0, 1, 2], [], None)
    _close(objective(p, s, mask, Ws, m, [], None), objective(p_ref, s, mask, Ws, m, [], None))
    np.testing.assert_allclose(p, p_ref, atol=1e-6)
    # warm start: converged already
    again, _ = CrossEntropyNewton().solve(problem, MixtureCrossEntropy(jnp.asarray(s), jnp.asarray(mask), jnp.asarray(m)), x)
    assert int(again.iterations) <= 1 and int(again.status) == Status.SOLVED


def test_no_constraints_is_probability_averaging():
    Ws, phat, m, problem = instance(seed=2, hard=None)
    s = np.array([0.2, 0.3, 0.5]) @ phat
    sol, _ = CrossEntropyNewton().solve(problem, MixtureCrossEntropy(jnp.asarray(s), jnp.ones(60, bool), jnp.asarray(m)))
    assert int(sol.status) == Status.SOLVED
    np.testing.assert_allclose(sol.p, s, atol=1e-12)


@pytest.mark.parametrize("hard,soft", [((0,), (1, 2)), ((), (0, 1, 2))])
def test_soft_matches_cvxpy(hard, soft):
    Ws, phat, m, problem = instance(seed=3, hard=hard, soft=soft, common=False)
    rho = np.array([2.0, 5.0, 30.0])
    s = phat.mean(0)
    mask = np.ones(60, bool)
    sol, _ = CrossEntropyNewton().solve(problem, MixtureCrossEntropy(jnp.asarray(s), jnp.asarray(mask), jnp.asarray(m), jnp.asarray(rho)))
    assert int(sol.status) == Status.SOLVED
    p = np.asarray(sol.p)
    p_ref = cvx_reverse_ce(s, mask, Ws, m, list(hard), list(soft), rho)
    _close(objective(p, s, mask, Ws, m, soft, rho), objective(p_ref, s, mask, Ws, m, soft, rho))
    np.testing.assert_allclose(p, p_ref, atol=1e-6)


def test_rank_deficient_and_zero_mass_tokens():
    Ws, phat, m, problem = instance(seed=4, dup=True)
    s = phat.mean(0)
    s[10:14] = 0.0  # zero mixture mass on allowed tokens
    sol, _ = CrossEntropyNewton().solve(problem, MixtureCrossEntropy(jnp.asarray(s), jnp.ones(60, bool), jnp.asarray(m)))
    assert int(sol.status) == Status.SOLVED
    p = np.asarray(sol.p)
    assert float(sol.primal_residual) <= 1e-8 and np.all(np.isfinite(p))
    mask = s > 0
    p_ref = cvx_reverse_ce(s, np.ones(60, bool), [Ws[0], Ws[2]], np.concatenate([m[:4], m[8:]]), [0, 1], [], None,
                           tight=False)
    _close(objective(p, s, mask, Ws, m, [], None), objective(p_ref, s, mask, Ws, m, [], None))


def test_nonfinite_and_vmap_compile_once():
    Ws, phat, m, problem = instance(seed=5)
    rng = np.random.default_rng(5)
    B = 3
    S = rng.dirichlet(np.ones(60), size=B) * 0.5 + 0.5 * phat.mean(0)
    S[2, 4] = np.nan
    solver = CrossEntropyNewton()
    f = jax.jit(jax.vmap(lambda P, *a: solver.solve(P, MixtureCrossEntropy(*a)), in_axes=(None, 0, None, None)))
    mask = jnp.ones(60, bool)
    sol, x = f(problem, jnp.asarray(S), mask, jnp.asarray(m))
    assert int(sol.status[2]) == Status.NONFINITE_INPUT
    np.testing.assert_allclose(sol.p[2], np.full(60, 1 / 60), atol=1e-15)
    assert np.all(np.isfinite(x))
    for b in range(2):
        row, _ = solver.solve(problem, MixtureCrossEntropy(jnp.asarray(S[b]), mask, jnp.asarray(m)))
        np.testing.assert_allclose(sol.p[b], row.p, atol=1e-12)
        assert int(sol.status[b]) == Status.SOLVED
    f(problem, jnp.asarray(S) * 0.9 + 0.1 / 60, mask, jnp.asarray(m))
    assert f._cache_size() == 1


def test_float32_agrees():
    Ws, phat, m, problem = instance(seed=6)
    p32 = make_problem(Ws, dtype=jnp.float32)
    s = phat.mean(0)
    mask = jnp.ones(60, bool)
    a, _ = CrossEntropyNewton().solve(problem, MixtureCrossEntropy(jnp.asarray(s), mask, jnp.asarray(m)))
    b, _ = CrossEntropyNewton().solve(p32, MixtureCrossEntropy(jnp.asarray(s, jnp.float32), mask, jnp.asarray(m, jnp.float32)))
    assert int(b.status) == Status.SOLVED and b.p.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b.p, np.float64), a.p, atol=1e-5, rtol=1e-4)
