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


def test_constrained_columns_cache_and_member_subsets():
    """A_con holds the constrained members' columns (contiguous) when some member is
    unconstrained; moments(members=...) and hard_products read it and agree with A's slices."""
    rng = np.random.default_rng(5)
    Ws = _members(rng)
    b = rng.normal(size=60)
    with jax.enable_x64(True):
        P = jaxens.make_problem(Ws, [None, b, None], hard=(2,), soft=(0,), dtype=jnp.float64)
        A = np.asarray(P.A)
        assert P.constrained == (0, 2)
        np.testing.assert_array_equal(np.asarray(P.A_con), A[:, P.columns((0, 2))])
        np.testing.assert_array_equal(np.asarray(P.A_hard), A[:, P.columns((2,))])
        np.testing.assert_array_equal(np.asarray(P.A_of((0,))), A[:, P.columns((0,))])
        probs = rng.dirichlet(np.ones(60), size=(4, 3))  # (B, n, v)
        full = np.stack([np.concatenate([probs[k, i] @ A[:, P.member_slice(i)] for i in range(3)]) for k in range(4)])
        np.testing.assert_allclose(np.asarray(P.moments(jnp.asarray(probs))), full, rtol=1e-12)
        sub = np.asarray(P.moments(jnp.asarray(probs), P.constrained))
        keep = P.columns((0, 2))
        np.testing.assert_allclose(sub[:, keep], full[:, keep], rtol=1e-12)
        assert np.all(sub[:, P.columns((1,))] == 0.0)
        np.testing.assert_allclose(np.asarray(P.moments(jnp.asarray(probs), (1,)))[:, P.columns((1,))],
                                   full[:, P.columns((1,))], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(P.hard_products(jnp.asarray(probs[:, 0]))),
                                   probs[:, 0] @ A[:, P.columns((2,))], rtol=1e-12)
        # with_A rebuilds the cache from the new A
        A2 = jnp.asarray(A * 2.0)
        P2 = P.with_A(A2)
        np.testing.assert_array_equal(np.asarray(P2.A_con), 2.0 * A[:, P.columns((0, 2))])
    # every member constrained, or none: no copy is kept
    assert jaxens.make_problem(Ws).A_con is None
    assert jaxens.make_problem(Ws, hard=None).A_con is None


def test_pad_problem_keeps_the_constrained_cache():
    from jaxens.sharding import pad_problem

    rng = np.random.default_rng(6)
    P = jaxens.make_problem(_members(rng), hard=(1,))
    Pp = pad_problem(P, 64)
    assert Pp.A_con.shape == (64, 5)
    np.testing.assert_array_equal(np.asarray(Pp.A_con)[:60], np.asarray(P.A_con))
    np.testing.assert_array_equal(np.asarray(Pp.A_con)[60:], 0.0)
