"""Learning combiner parameters through the combiners (jaxens.learn)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxens import learn
from jaxens.combiners.averaging import logit_average, prob_average
from jaxens.problem import make_problem

V = 48


def _case(seed, P=96):
    """Member 0 puts extra mass on the observed token; member 1 is noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, V, P)
    good = rng.normal(size=(P, V)) + 3.0 * np.eye(V)[y]
    bad = 2.0 * rng.normal(size=(P, V))
    return [good.astype(np.float32), bad.astype(np.float32)], y


def _nll(comb, logits, y):
    logp, _, _ = comb.combine([jnp.asarray(x) for x in logits], comb.init(len(y)))
    return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=-1)))


@pytest.mark.parametrize("factory", [learn.prob_average_factory, learn.logit_average_factory])
def test_learning_weights_lowers_heldout_nll(factory):
    train, y = _case(0)
    held, y2 = _case(1)
    p0 = learn.averaging_params(2)
    params, hist = learn.fit(train, y, factory, p0, steps=60, optimizer=optax.adam(0.1))
    assert hist["loss"].shape == (61,)
    assert hist["loss"].min() < hist["loss"][0] - 0.2
    w = learn.readable(params)["weights"]
    assert w[0] > 0.8, w  # the informative member wins
    assert _nll(factory(params), held, y2) < _nll(factory(p0), held, y2) - 0.1
    # the returned params are the best seen
    assert _nll(factory(params), train, y) == pytest.approx(hist["loss"].min(), rel=1e-4)


def test_fit_chunked_matches_full_batch():
    train, y = _case(2, P=40)
    p0 = learn.averaging_params(2, temperature=1.5)
    a, ha = learn.fit(train, y, learn.prob_average_factory, p0, steps=5)
    b, hb = learn.fit(train, y, learn.prob_average_factory, p0, steps=5, batch_rows=16)  # 3 chunks, padded
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-5)
    jax.tree.map(lambda x, z: np.testing.assert_allclose(x, z, rtol=1e-4, atol=1e-6), a, b)


def test_learn_bottleneck_kl_soft():
    """Weights, per-member rho and lambda learned through the entropic Newton solver."""
    rng = np.random.default_rng(0)
    n, d, P = 2, 4, 12
    Ws = [rng.normal(size=(V, d)) for _ in range(n)]
    hs = [rng.normal(size=(P, d)) * 1.5 for _ in range(n)]
    logits = [(h @ W.T).astype(np.float32) for h, W in zip(hs, Ws)]
    y = np.asarray([int(np.argmax(logits[0][r] + rng.gumbel(size=V))) for r in range(P)])  # member 0's samples
    problem = make_problem(Ws, None, hard=(), soft=(0, 1))
    p0 = learn.bottleneck_params(n, rho=1.0, lam=0.2)
    params, hist = learn.fit(logits, y, learn.bottleneck_kl_factory, p0, steps=8,
                             optimizer=optax.adam(0.2), context=problem)
    assert np.all(np.isfinite(hist["loss"]))
    assert hist["loss"].min() < hist["loss"][0]
    r = learn.readable(params)
    assert set(r) == {"weights", "rho", "lam"} and 0 < r["lam"] < 1 and min(r["rho"]) > 0
    assert r["weights"][0] > 0.5  # the member that generated the targets gains weight


def test_sensitivity_matches_closed_forms():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, V)).astype(np.float32) * 2
    w = np.asarray([0.3, 0.7], np.float32)
    y = 5
    ph = jax.nn.softmax(jnp.asarray(x), -1)
    # probability averaging: w_i p_iy (e_y - p_i) / p_y
    val, g = learn.sensitivity(list(x), y, prob_average(jnp.asarray(w)))
    p = jnp.sum(w[:, None] * ph, 0)
    ey = jnp.eye(V)[y]
    want = w[:, None] * ph[:, y : y + 1] * (ey[None] - ph) / p[y]
    np.testing.assert_allclose(g, want, atol=1e-5)
    assert val == pytest.approx(float(jnp.log(p[y])), abs=1e-5)
    # logit averaging: w_i (e_y - p)
    _, g = learn.sensitivity(x, y, logit_average(jnp.asarray(w)))
    q = jax.nn.softmax(jnp.sum(w[:, None] * jax.nn.log_softmax(jnp.asarray(x), -1), 0))
    np.testing.assert_allclose(g, w[:, None] * (ey - q)[None], atol=1e-5)
    text = learn.sensitivity_report(g, ["a", "b"], top=3)
    assert text.count("\n") == 1 and "a" in text and "top:" in text


@pytest.mark.no_typecheck
def test_fit_bad_inputs():
    train, y = _case(0, P=8)
    with pytest.raises(ValueError, match="targets"):
        learn.fit(train, y[:-1], learn.prob_average_factory, learn.averaging_params(2), steps=1)
    with pytest.raises(ValueError, match="token ids"):
        learn.fit(train, y + V, learn.prob_average_factory, learn.averaging_params(2), steps=1)
    with pytest.raises(ValueError, match="one shape"):
        learn.fit([train[0], train[1][:, :10]], y, learn.prob_average_factory, learn.averaging_params(2), steps=1)
    with pytest.raises(ValueError, match="lam"):
        learn.bottleneck_params(2, lam=1.0)
    with pytest.raises(ValueError, match="token"):
        learn.sensitivity(train[0][:2], V + 1, prob_average())
