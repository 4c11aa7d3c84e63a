"""BottleneckProblem: cached basis, rank handling, moments and the beta map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxens


def _members(rng, v=60, dims=(4, 5, 3)):
    return [rng.normal(size=(v, d)) for d in dims]


def test_basis_spans_constraints_and_beta_reproduces_them():
    rng = np.random.default_rng(1)
    Ws = _members(rng)
    b = rng.normal(size=60)
    with jax.enable_x64(True):
        P = jaxens.make_problem(Ws, [None, b, None], dtype=jnp.float64)
        assert P.member_cols == (4, 6, 3)
        C = np.concatenate([np.asarray(P.A), np.ones((60, 1))], axis=1)
        assert P.rank == np.linalg.matrix_rank(C)
        Q = np.asarray(P.Q)
        np.testing.assert_allclose(Q.T @ Q, np.eye(P.rank), atol=1e-10)
        # C lies in span(Q)
        np.testing.assert_allclose(Q @ (Q.T @ C), C, atol=1e-10)
        # for a p satisfying the constraints, beta(m) == Q^T p
        p = rng.dirichlet(np.ones(60))
        m = P.moments(jnp.asarray(np.stack([p, p, p])))
        np.testing.assert_allclose(np.asarray(P.beta(m)), Q.T @ p, atol=1e-10)
        np.testing.assert_allclose(np.asarray(P.hard_residual(jnp.asarray(p), m)), 0.0, atol=1e-12)


def test_duplicated_members_reduce_rank():
    rng = np.random.default_rng(2)
    W = rng.normal(size=(40, 6))
    P = jaxens.make_problem([W, W, W[:, :3]])
    assert P.rank == 7  # 6 directions + the ones vector
    assert P.A.shape == (40, 15)


def test_subset_constraints_and_lipschitz():
    rng = np.random.default_rng(3)
    Ws = _members(rng)
    P = jaxens.make_problem(Ws, hard=(1,), soft=(0, 2))
    assert P.hard == (1,) and P.soft == (0, 2) and P.rank == 6
    assert np.isclose(float(P.lipschitz_hard), np.linalg.norm(Ws[1], 2) ** 2, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(P.lipschitz_members), [np.linalg.norm(W, 2) ** 2 for W in Ws], rtol=1e-5
    )


def test_problem_is_a_pytree_usable_under_jit():
    rng = np.random.default_rng(4)
    P = jaxens.make_problem(_members(rng))
    f = jax.jit(lambda prob, x: prob.moments(x))
    x = jnp.asarray(rng.dirichlet(np.ones(60), size=3), jnp.float32)
    np.testing.assert_allclose(np.asarray(f(P, x)), np.asarray(P.moments(x)), rtol=1e-5)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([np.zeros((10, 2)), np.zeros((11, 2))],), {}, r"different vocabulary sizes.*\(10, 2\).*\(11, 2\)"),
        (([np.zeros((10, 2))], [np.zeros(9)]), {}, r"bias 0 must have shape \(10,\)"),
        (([np.zeros((10, 2))],), {"hard": (3,)}, "out of range"),
        (([np.zeros((10, 2)), np.ones((10, 2))],), {"hard": (0,), "soft": (0,)}, "both hard and soft"),
        (([np.full((10, 2), np.nan)],), {}, "NaN or inf"),
        (([],), {}, "at least one member"),
        (([np.zeros(10)],), {}, r"\(v, d\) matrix"),
    ],
)
def test_bad_input_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxens.make_problem(*args, **kwargs)


def test_moments_shape_error():
    P = jaxens.make_problem([np.eye(5)[:, :2]])
    with pytest.raises(ValueError, match=r"\(\.\.\., n=1, v=5\)"):
        P.moments(jnp.ones((2, 5)))
