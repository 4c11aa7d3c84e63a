"""Wolfe's minimum-norm point (the least-squares phase without caps) against Clarabel (cvxpy),
in float64 and float32, on infeasible and feasible rows, with masks, batched."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxens import make_problem
from jaxens.solvers.least_squares import least_squares
from jaxens.solvers.min_norm_point import MinNormPoint, min_norm_point
from jaxens.solvers.solution import Status


def _reference(G, m, mask):
    p = cp.Variable(G.shape[0])
    pr = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(G.T @ p - m)), [p >= 0, cp.sum(p) == 1, p[~mask] == 0])
    pr.solve(solver="CLARABEL")
    return pr.value


def _case(seed, v, D, shift):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(v, D))
    m = G.mean(0) + shift * rng.normal(size=D)  # shift > 0: m outside the hull (infeasible)
    mask = rng.random(v) > 0.1
    return G, m, mask


@pytest.mark.x64
@pytest.mark.parametrize("seed,v,D", [(0, 400, 12), (1, 1500, 60), (2, 2500, 150)])
def test_float64_matches_clarabel_and_certifies(seed, v, D):
    G, m, mask = _case(seed, v, D, 3.0)
    ref = _reference(G, m, mask)
    assert ref > 1e-3  # the row is infeasible: the origin lies outside the hull
    r = min_norm_point(jnp.asarray(G), jnp.asarray(m), jnp.asarray(mask), MinNormPoint())
    p = np.asarray(r.p)
    assert bool(r.converged) and float(r.gap) <= 1e-8
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-12 and np.all(p[~mask] == 0)
    f = 0.5 * np.sum((G.T @ p - m) ** 2)
    assert abs(f - ref) <= 1e-6 * ref, (f, ref)
    np.testing.assert_allclose(np.asarray(r.x), G.T @ p - m, atol=1e-10)
    # Farkas margin min_j P_j^T x / ||x|| (evaluated independently) equals ||x|| at the optimum
    x = G.T @ p - m
    margin = np.min(((G - m) @ x)[mask]) / np.linalg.norm(x)
    np.testing.assert_allclose(margin, np.sqrt(2 * ref), rtol=1e-5)
    assert int(r.majors) >= np.count_nonzero(p)  # points entered >= support (deletions happen)


def test_float32_batched_matches_clarabel():
    cases = [_case(s, 1200, 48, 3.0) for s in range(4)]
    G = cases[0][0]
    ms = np.stack([c[1] for c in cases])
    masks = np.stack([c[2] for c in cases])
    r = jax.vmap(lambda m, k: min_norm_point(jnp.asarray(G, jnp.float32), m, k))(
        jnp.asarray(ms, jnp.float32), jnp.asarray(masks))
    for i in range(4):
        ref = _reference(G, ms[i], masks[i])
        p = np.asarray(r.p[i], np.float64)
        f = 0.5 * np.sum((G.T @ p - ms[i]) ** 2)
        assert bool(r.converged[i])
        assert abs(f - ref) <= 5e-3 * ref + 1e-6, (i, f, ref)  # float32 tol: relative FW gap 5e-3
        assert np.all(p[~masks[i]] == 0)


@pytest.mark.x64
def test_feasible_row_stops_at_the_feasibility_tolerance():
    rng = np.random.default_rng(3)
    v, D = 800, 30
    G = rng.normal(size=(v, D))
    m = G.T @ rng.dirichlet(np.ones(v))  # inside the hull
    r = min_norm_point(jnp.asarray(G), jnp.asarray(m), jnp.ones(v, bool), MinNormPoint(), 1e-7)
    assert bool(r.converged)
    assert np.linalg.norm(np.asarray(r.x)) <= 1e-7


@pytest.mark.x64
def test_least_squares_phase_uses_it_on_real_shaped_blocks():
    """The least-squares phase (default solver, no caps) on a 3-member problem: the verdict and
    the certificate match FISTA's and Clarabel's value."""
    rng = np.random.default_rng(5)
    v, d = 100, 30  # n d = 90 close to v: each member its own p, no common one
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(3)]
    m = np.concatenate([W.T @ rng.dirichlet(0.3 * np.ones(v)) for W in Ws])
    prob = make_problem(Ws, dtype=jnp.float64)
    sol = least_squares(prob, jnp.asarray(m), jnp.ones(v, bool))
    assert int(sol.status) == Status.INFEASIBLE
    A = np.concatenate(Ws, axis=1)
    ref = _reference(A, m, np.ones(v, bool))
    p = np.asarray(sol.p)
    np.testing.assert_allclose(0.5 * np.sum((A.T @ p - m) ** 2), ref, rtol=1e-6)
    np.testing.assert_allclose(float(sol.certificate_margin), np.sqrt(2 * ref), rtol=1e-5)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="block"):
        MinNormPoint(block=0)


@pytest.mark.x64
def test_least_squares_objective_gradient_on_the_support_matches_finite_differences_and_fista():
    """The default least_squares objective (MinNormPoint, differentiable=True): the gradient of a
    loss of p w.r.t. the moments equals central finite differences and FISTA's implicit adjoint."""
    from jaxens.solvers.fista import FISTA
    from jaxens.solvers.instances import LeastSquaresProgram
    from jaxens.solvers.least_squares import LeastSquares

    rng = np.random.default_rng(8)
    v, d = 100, 30
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(3)]
    m0 = np.concatenate([W.T @ rng.dirichlet(0.3 * np.ones(v)) for W in Ws])
    prob = make_problem(Ws, dtype=jnp.float64)
    a = jnp.asarray(rng.normal(size=v))
    mask = jnp.ones(v, bool)

    def loss(m, solver):
        sol, _ = solver.solve(prob, LeastSquaresProgram(mask, m), None)
        return a @ sol.p, sol

    mnp = LeastSquares()
    (val, sol), g = jax.value_and_grad(lambda m: loss(m, mnp), has_aux=True)(jnp.asarray(m0))
    assert int(sol.status) == Status.INFEASIBLE
    g = np.asarray(g)
    assert np.linalg.norm(g) > 1e-6  # a real gradient, not a stopped one
    direction = rng.normal(size=m0.shape)
    h = 1e-6
    fd = (float(loss(jnp.asarray(m0 + h * direction), mnp)[0]) - float(loss(jnp.asarray(m0 - h * direction), mnp)[0])) / (2 * h)
    np.testing.assert_allclose(g @ direction, fd, rtol=1e-4, atol=1e-8)
    fista = LeastSquares(fista=FISTA(tol=1e-14, max_iters=50000))
    gf = np.asarray(jax.grad(lambda m: loss(m, fista)[0])(jnp.asarray(m0)))
    np.testing.assert_allclose(g, gf, rtol=1e-3, atol=1e-6 * np.abs(gf).max())
