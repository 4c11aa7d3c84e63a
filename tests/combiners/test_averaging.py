"""Logit and probability averaging against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxens
from jaxens.solvers.solution import Status


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(4, 37)) * s for s in (1.0, 3.0, 0.5)]


def test_logit_average_matches_reference(logits):
    w = np.array([0.2, 0.5, 0.3])
    c = jaxens.logit_average(w)
    out, _, info = jax.jit(c.combine)([jnp.asarray(x, jnp.float32) for x in logits], c.init(4))
    ref = _np_log_softmax(sum(wi * _np_log_softmax(x) for wi, x in zip(w, logits)))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    assert not np.any(info.nonfinite)


def test_prob_average_matches_reference(logits):
    w = np.array([0.2, 0.5, 0.3])
    c = jaxens.prob_average(w)
    out, _, _ = jax.jit(c.combine)([jnp.asarray(x, jnp.float32) for x in logits], c.init(4))
    ref = np.log(sum(wi * np.exp(_np_log_softmax(x)) for wi, x in zip(w, logits)))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_masked_tokens_and_zero_weights():
    a = jnp.array([[0.0, 1.0, -jnp.inf, 2.0]])
    b = jnp.array([[1.0, -jnp.inf, 0.0, 2.0]])
    la = jaxens.logit_average().combine([a, b], None)[0]
    assert np.isneginf(np.asarray(la)[0, 1]) and np.isneginf(np.asarray(la)[0, 2])
    assert np.isclose(np.exp(np.asarray(la)).sum(), 1.0, atol=1e-6)
    # a member with zero weight does not veto tokens (and no 0 * -inf NaN)
    lz = jaxens.logit_average(jnp.array([1.0, 0.0])).combine([a, b], None)[0]
    np.testing.assert_allclose(np.asarray(lz), np.asarray(jax.nn.log_softmax(a)), atol=1e-6)
    pa = jaxens.prob_average().combine([a, b], None)[0]
    assert np.all(np.isfinite(np.asarray(pa)))


def test_nan_logits_drop_the_member_from_that_row():
    a = jnp.array([[0.0, jnp.nan, 1.0], [0.0, 1.0, 2.0]])
    b = jnp.array([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    for comb in (jaxens.logit_average(), jaxens.prob_average()):
        out, _, info = comb.combine([a, b], None)
        np.testing.assert_array_equal(np.asarray(info.nonfinite), [True, False])
        np.testing.assert_array_equal(np.asarray(info.bad_members), [[True, False], [False, False]])
        assert np.asarray(info.status).tolist() == [Status.NONFINITE_INPUT, Status.SOLVED]
        # row 0 is member b's distribution alone (its weight renormalised to 1)
        np.testing.assert_allclose(np.asarray(out[0]), np.asarray(jax.nn.log_softmax(b[0])), atol=1e-6)
        assert np.all(np.isfinite(np.asarray(out)))


def test_shape_errors_name_both_shapes():
    c = jaxens.logit_average()
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\)"):
        c.combine([jnp.zeros((2, 5)), jnp.zeros((2, 6))], None)
    with pytest.raises(ValueError, match="weights must have shape"):
        jaxens.prob_average(jnp.ones(3)).combine([jnp.zeros((2, 5)), jnp.zeros((2, 5))], None)
    with pytest.raises(ValueError, match="empty batch"):
        c.combine([jnp.zeros((0, 5))], None)


def test_gradients_wrt_weights_and_logits(logits):
    with jax.enable_x64(True):
        xs = [jnp.asarray(x, jnp.float64) for x in logits]

        def f(w, x0):
            out, _, _ = jaxens.prob_average(w).combine([x0, xs[1], xs[2]], None)
            return out[:, 3]

        check_grads(f, (jnp.array([0.2, 0.5, 0.3]), xs[0]), order=1, modes=["rev"], eps=1e-6)

        def g(w, x0):
            out, _, _ = jaxens.logit_average(w).combine([x0, xs[1], xs[2]], None)
            return out[:, 5]

        check_grads(g, (jnp.array([0.2, 0.5, 0.3]), xs[0]), order=1, modes=["rev"], eps=1e-6)


def test_normalized_weights_checks_and_normalises():
    from jaxens.combiners.base import normalized_weights

    np.testing.assert_allclose(np.asarray(normalized_weights([2.0, 1.0, 1.0], 3)), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(np.asarray(normalized_weights(None, 4)), [0.25] * 4)
    with pytest.raises(ValueError, match=r"ME has 2 weights but the ensemble has 3 members"):
        normalized_weights([1.0, 1.0], 3, owner="ME")
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        normalized_weights(jnp.ones((3, 1)), 3)
