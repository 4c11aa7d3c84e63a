"""FISTA over the masked simplex vs cvxpy (OSQP / Clarabel) in float64."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxens import make_problem
from jaxens.solvers.fista import FISTA
from jaxens.solvers.instances import PenalisedProgram
from jaxens.solvers.projections import project_capped_simplex, project_masked_simplex
from jaxens.solvers.solution import Status


pytestmark = pytest.mark.x64


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _instance(seed, v=80, n=3, d=6, soft=(2,), hard=(0, 1)):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(n)]
    ph = np.stack([_softmax(2 * rng.normal(size=v)) for _ in range(n)])
    prob = make_problem(Ws, hard=hard, soft=soft, dtype=jnp.float64)
    m = np.asarray(prob.moments(jnp.asarray(ph)))
    return prob, Ws, ph, m


def _cvx_reference(prob, Ws, m, c, F, mask, rho, h, ub=None):
    v = c.shape[0]
    p = cp.Variable(v)
    obj = 0.5 * cp.sum_squares(F.T @ p) + c @ p
    cols = np.cumsum([0] + [W.shape[1] for W in Ws])
    for i in prob.soft:
        obj += rho[i] / 2 * cp.sum_squares(Ws[i].T @ p - m[cols[i] : cols[i + 1]])
    for i in prob.hard:
        obj += h / 2 * cp.sum_squares(Ws[i].T @ p - m[cols[i] : cols[i + 1]])
    cons = [p >= 0, cp.sum(p) == 1, p[~mask] == 0]
    if ub is not None:
        cons.append(p <= ub)
    pr = cp.Problem(cp.Minimize(obj), cons)
    pr.solve(solver="CLARABEL")
    return pr.value


def _objective(prob, Ws, m, c, F, rho, h, p):
    cols = np.cumsum([0] + [W.shape[1] for W in Ws])
    f = 0.5 * np.sum((F.T @ p) ** 2) + c @ p
    for i in prob.soft:
        f += rho[i] / 2 * np.sum((Ws[i].T @ p - m[cols[i] : cols[i + 1]]) ** 2)
    for i in prob.hard:
        f += h / 2 * np.sum((Ws[i].T @ p - m[cols[i] : cols[i + 1]]) ** 2)
    return f


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_ub", [False, True])
def test_fista_matches_cvxpy(seed, with_ub):
    prob, Ws, ph, m = _instance(seed)
    v = prob.vocab_size
    rng = np.random.default_rng(100 + seed)
    F = np.sqrt(2) * np.log(ph[:2]).T / 10.0  # v x 2
    c = rng.normal(size=v) * 0.1
    mask = rng.uniform(size=v) > 0.2
    rho = np.array([0.0, 0.0, 3.0])
    h = 1.5
    ub = np.where(mask, 0.05, 0.0) if with_ub else None
    solver = FISTA(tol=1e-10, max_iters=20000)
    sol, p = solver.solve(prob, PenalisedProgram(jnp.asarray(c), jnp.asarray(F), jnp.asarray(mask), jnp.asarray(m), jnp.asarray(rho), hard_weight=h, ub=None if ub is None else jnp.asarray(ub)))
    p = np.asarray(p)
    assert int(sol.status) == Status.SOLVED
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-12 and np.all(p[~mask] == 0)
    if ub is not None:
        assert np.all(p <= ub + 1e-12)
    ref = _cvx_reference(prob, Ws, m, c, F, mask, rho, h, ub)
    f = _objective(prob, Ws, m, c, F, rho, h, p)
    assert abs(f - ref) <= 1e-6 * (1 + abs(ref))
    assert float(sol.gap) >= f - ref - 1e-9  # the FW gap bounds suboptimality


def test_fista_vmap_one_compile_and_nonfinite():
    prob, Ws, ph, m = _instance(3, soft=(), hard="all")
    v, B = prob.vocab_size, 4
    rng = np.random.default_rng(0)
    c = jnp.asarray(rng.normal(size=(B, v)))
    c = c.at[2, 5].set(jnp.nan)
    masks = jnp.asarray(rng.uniform(size=(B, v)) > 0.1)
    ms = jnp.broadcast_to(jnp.asarray(m), (B, m.shape[0]))
    solver = FISTA(tol=1e-8, max_iters=3000)

    def row(c, mask, m):
        return solver.solve(prob, PenalisedProgram(c, jnp.zeros((v, 0)), mask, m, jnp.zeros(3), hard_weight=2.0))[0]

    f = jax.jit(jax.vmap(row))
    sol = f(c, masks, ms)
    assert sol.p.shape == (B, v)
    assert np.all(np.isfinite(np.asarray(sol.p)))
    st = np.asarray(sol.status)
    assert st[2] == Status.NONFINITE_INPUT
    np.testing.assert_allclose(np.asarray(sol.p[2]), np.where(masks[2], 1 / masks[2].sum(), 0))
    assert all(s == Status.SOLVED for i, s in enumerate(st) if i != 2)
    for b in (0, 1, 3):  # each batched row equals the unbatched solve
        np.testing.assert_allclose(np.asarray(sol.p[b]), np.asarray(row(c[b], masks[b], ms[b]).p), atol=1e-10)
    sol2 = f(c + 1.0, masks, ms)
    assert sol2.p.shape == (B, v)
    assert f._cache_size() == 1


def test_projections_match_cvxpy():
    rng = np.random.default_rng(0)
    v = 40
    y = rng.normal(size=v)
    mask = rng.uniform(size=v) > 0.3
    ub = np.where(mask, rng.uniform(0.02, 0.2, size=v), 0.0)
    for ubx in (None, ub):
        p = cp.Variable(v)
        cons = [p >= 0, cp.sum(p) == 1, p[~mask] == 0] + ([p <= ubx] if ubx is not None else [])
        cp.Problem(cp.Minimize(cp.sum_squares(p - y)), cons).solve(solver="CLARABEL")
        got = (
            project_masked_simplex(jnp.asarray(y), jnp.asarray(mask))
            if ubx is None
            else project_capped_simplex(jnp.asarray(y), jnp.asarray(ubx))
        )
        np.testing.assert_allclose(np.asarray(got), p.value, atol=1e-6)


@pytest.mark.no_typecheck
def test_bad_shapes_raise():
    prob, Ws, ph, m = _instance(0)
    v = prob.vocab_size
    with pytest.raises(ValueError, match="c must have shape"):
        FISTA().solve(prob, PenalisedProgram(jnp.zeros(v + 1), jnp.zeros((v, 0)), jnp.ones(v, bool), jnp.asarray(m), jnp.zeros(3)))
    with pytest.raises(ValueError, match="rho must have shape"):
        FISTA().solve(prob, PenalisedProgram(jnp.zeros(v), jnp.zeros((v, 0)), jnp.ones(v, bool), jnp.asarray(m), jnp.zeros(2)))


def test_inf_cost_off_mask_is_ignored():
    prob, Ws, ph, m = _instance(4, soft=(), hard="all")
    v = prob.vocab_size
    mask = np.ones(v, bool)
    mask[:5] = False
    c = np.zeros(v)
    c[:5] = np.inf  # -log 0 on masked tokens
    F = np.log(ph[:2]).T.copy()
    F[:5] = -np.inf
    sol, p = FISTA(tol=1e-8).solve(prob, PenalisedProgram(jnp.asarray(c), jnp.asarray(F), jnp.asarray(mask), jnp.asarray(m), jnp.zeros(3), hard_weight=2.0))
    assert int(sol.status) == Status.SOLVED
    assert np.all(np.asarray(p)[:5] == 0) and np.all(np.isfinite(np.asarray(p)))
