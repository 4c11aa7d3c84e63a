"""Projections and linear minimisation oracles (jaxens.solvers.projections): values against a
sorting-based numpy reference / cvxpy, and Jacobians against central finite differences (float64)
and the closed form on the support, J = diag(s) - s s^T / |s|."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxens.solvers.projections import (
    max_linear,
    min_linear,
    project,
    project_capped_simplex,
    project_masked_simplex,
    uniform_on,
)


@pytest.fixture(autouse=True, scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def _simplex_ref(y, mask):
    """Sorting-based Euclidean projection onto the simplex restricted to ``mask`` (Held et al. 1974)."""
    y = np.asarray(y, np.float64)
    out = np.zeros_like(y)
    ym = y[mask]
    u = np.sort(ym)[::-1]
    css = np.cumsum(u)
    k = np.arange(1, u.size + 1)
    rho = np.nonzero(u - (css - 1) / k > 0)[0][-1]
    tau = (css[rho] - 1) / (rho + 1)
    out[mask] = np.maximum(ym - tau, 0.0)
    return out


def _capped_ref(y, ub):
    p = cp.Variable(y.size)
    cp.Problem(cp.Minimize(cp.sum_squares(p - y)), [p >= 0, p <= ub, cp.sum(p) == 1]).solve(
        solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12
    )
    return p.value


@pytest.mark.parametrize("seed", range(5))
def test_masked_simplex_matches_sorting_reference(seed):
    rng = np.random.default_rng(seed)
    v = 40
    y = rng.normal(size=v) * (0.3 + seed)
    mask = rng.random(v) > 0.3
    p = np.asarray(project_masked_simplex(jnp.asarray(y), jnp.asarray(mask)))
    np.testing.assert_allclose(p, _simplex_ref(y, mask), atol=1e-12)
    assert np.all(p[~mask] == 0) and abs(p.sum() - 1) < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_capped_simplex_matches_cvxpy(seed):
    rng = np.random.default_rng(seed)
    v = 30
    y = rng.normal(size=v)
    ub = rng.uniform(0.02, 0.2, size=v)
    ub[rng.random(v) < 0.2] = 0.0  # masked tokens
    p = np.asarray(project_capped_simplex(jnp.asarray(y), jnp.asarray(ub)))
    np.testing.assert_allclose(p, _capped_ref(y, ub), atol=1e-7)
    assert np.all(p >= 0) and np.all(p <= ub + 1e-15) and abs(p.sum() - 1) < 1e-10


def test_project_dispatches_on_caps():
    rng = np.random.default_rng(7)
    y = jnp.asarray(rng.normal(size=20))
    mask = jnp.asarray(rng.random(20) > 0.2)
    np.testing.assert_array_equal(project(y, mask, None), project_masked_simplex(y, mask))
    ub = jnp.full(20, 0.3)
    np.testing.assert_allclose(project(y, mask, ub), project_capped_simplex(y, jnp.where(mask, ub, 0.0)))


def _central_jacobian(f, y, h=1e-6):
    cols = []
    for j in range(y.size):
        e = np.zeros_like(y)
        e[j] = h
        cols.append((np.asarray(f(jnp.asarray(y + e))) - np.asarray(f(jnp.asarray(y - e)))) / (2 * h))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("seed", range(3))
def test_masked_simplex_jacobian(seed):
    rng = np.random.default_rng(10 + seed)
    v = 25
    y = rng.normal(size=v)
    mask = rng.random(v) > 0.25
    f = lambda yy: project_masked_simplex(yy, jnp.asarray(mask))  # noqa: E731
    J = np.asarray(jax.jacobian(f)(jnp.asarray(y)))
    p = np.asarray(f(jnp.asarray(y)))
    s = (p > 0).astype(np.float64)
    # no coordinate sits at the kink (the threshold tau): the projection is smooth at y
    tau = (y - p)[p > 0][0]
    assert np.min(np.abs(y[mask] - tau)) > 1e-4
    closed = np.diag(s) - np.outer(s, s) / s.sum()
    np.testing.assert_allclose(J, closed, atol=1e-12)
    np.testing.assert_allclose(J, _central_jacobian(f, y), atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_capped_simplex_jacobian(seed):
    rng = np.random.default_rng(20 + seed)
    v = 20
    y = rng.normal(size=v)
    ub = rng.uniform(0.05, 0.3, size=v)
    f = lambda yy: project_capped_simplex(yy, jnp.asarray(ub))  # noqa: E731
    J = np.asarray(jax.jacobian(f)(jnp.asarray(y)))
    p = np.asarray(f(jnp.asarray(y)))
    free = ((p > 1e-9) & (p < ub - 1e-9)).astype(np.float64)
    closed = np.diag(free) - np.outer(free, free) / free.sum()
    np.testing.assert_allclose(J, closed, atol=1e-9)
    np.testing.assert_allclose(J, _central_jacobian(f, y), atol=1e-6)


@pytest.mark.parametrize("capped", [False, True])
def test_linear_oracles(capped):
    rng = np.random.default_rng(3)
    v = 15
    g = rng.normal(size=v)
    mask = rng.random(v) > 0.3
    ub = rng.uniform(0.1, 0.5, size=v) if capped else None
    s = cp.Variable(v)
    cons = [s >= 0, cp.sum(s) == 1, s[~mask] == 0]
    if capped:
        cons.append(s <= ub)
    lo = cp.Problem(cp.Minimize(g @ s), cons).solve(solver="CLARABEL")
    hi = -cp.Problem(cp.Minimize(-g @ s), cons).solve(solver="CLARABEL")
    u = None if ub is None else jnp.asarray(ub)
    assert abs(float(min_linear(jnp.asarray(g), jnp.asarray(mask), u)) - lo) < 1e-7
    assert abs(float(max_linear(jnp.asarray(g), jnp.asarray(mask), u)) - hi) < 1e-7


def test_uniform_on():
    mask = jnp.asarray([True, False, True, True])
    np.testing.assert_allclose(uniform_on(mask, jnp.float64), [1 / 3, 0, 1 / 3, 1 / 3])
    assert np.all(np.asarray(uniform_on(jnp.zeros(4, bool), jnp.float32)) == 0)
    assert uniform_on(mask, jnp.float32).dtype == jnp.float32
