"""DeePEn (jaxens.vocab.deepen): chunked / top-k relative transforms and the AdamW inverse against a
dense float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxens.vocab import deepen as dp

V, D, A, B = 301, 16, 40, 3


pytestmark = pytest.mark.x64


def _data(seed=0, peak=3.0):
    rng = np.random.default_rng(seed)
    E = jnp.asarray(rng.normal(size=(V, D)))
    anchors = jnp.asarray(rng.choice(V, A, replace=False).astype(np.int32))
    logits = jnp.asarray(peak * rng.normal(size=(B, V)))
    return E, anchors, logits


def test_relative_chunked_matches_dense():
    E, a, z = _data()
    p = jax.nn.softmax(z, -1)
    R = np.asarray(dp.dense_relative_matrix(E, a, 20.0))
    assert np.allclose(R.sum(1), 1.0)
    got = dp.relative_chunked(p, E, a, 20.0, chunk=64)  # 301 rows: the last chunk is padded
    np.testing.assert_allclose(np.asarray(got), np.asarray(p) @ R, rtol=1e-12, atol=1e-14)
    g = jnp.asarray(np.random.default_rng(1).random((B, A)))
    np.testing.assert_allclose(np.asarray(dp.relative_rmatvec_chunked(g, E, a, 20.0, chunk=64)),
                               np.asarray(g) @ R.T, rtol=1e-12, atol=1e-14)


def test_topk_error_bound():
    E, a, z = _data(2, peak=4.0)
    p = jax.nn.softmax(z, -1)
    exact = np.asarray(dp.relative_chunked(p, E, a, 50.0, chunk=128))
    full, m = dp.relative_topk(p, E, a, 50.0, k=V)
    np.testing.assert_allclose(np.asarray(full), exact, rtol=1e-10, atol=1e-13)
    for k in (5, 20, 60):
        r, mass = dp.relative_topk(p, E, a, 50.0, k=k)
        err = np.abs(np.asarray(r) - exact).sum(-1)
        assert np.all(err <= 2 * (1 - np.asarray(mass)) + 1e-12)


@pytest.mark.parametrize("steps,lr", [(5, 0.15), (3, 0.5)])
def test_inverse_chunked_matches_dense_float64(steps, lr):
    E, a, z0 = _data(3)
    rng = np.random.default_rng(4)
    target = jax.nn.softmax(jnp.asarray(3 * rng.normal(size=(B, A))), -1)
    ref = jax.jit(dp.dense_inverse, static_argnums=(4, 5, 6))(z0, target, E, a, 30.0, steps, lr)
    got, kl = jax.jit(lambda z, t: dp.inverse(z, t, E, a, 30.0, steps, lr, "chunked", 64))(z0, target)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-9, atol=1e-9)
    R = np.asarray(dp.dense_relative_matrix(E, a, 30.0))
    r = np.asarray(jax.nn.softmax(ref, -1)) @ R
    t = np.asarray(target)
    np.testing.assert_allclose(np.asarray(kl), (t * np.log(t / r)).sum(-1), rtol=1e-9)
    r0 = np.asarray(jax.nn.softmax(z0, -1)) @ R
    assert np.all(np.asarray(kl) < (t * np.log(t / r0)).sum(-1))  # the search reduces the KL


def test_inverse_topk_full_support_matches_dense():
    E, a, z0 = _data(5)
    target = jax.nn.softmax(jnp.asarray(2 * np.random.default_rng(6).normal(size=(B, A))), -1)
    ref = jax.jit(dp.dense_inverse, static_argnums=(4, 5, 6))(z0, target, E, a, 30.0, 5, 0.15)
    got, _ = dp.inverse(z0, target, E, a, 30.0, 5, 0.15, "topk", k=V)
    # same softmax (the top-k form works on a permuted support)
    np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(got, -1)), np.asarray(jax.nn.log_softmax(ref, -1)),
                               atol=1e-9)


def test_deepen_combine_float32_close_to_float64():
    E, a, _ = _data(7)
    rng = np.random.default_rng(8)
    E2 = jnp.asarray(rng.normal(size=(200, 12)))
    a2 = jnp.asarray(rng.choice(200, A, replace=False).astype(np.int32))
    lps = [jax.nn.log_softmax(jnp.asarray(3 * rng.normal(size=(B, n))), -1) for n in (V, 200)]
    w = jnp.asarray([0.5, 0.5])
    ref, info = dp.deepen_combine(lps, [E, E2], [a, a2], w, scale=30.0, mode="chunked", chunk=64)
    assert np.all(np.asarray(info.kl) <= np.asarray(info.kl0))
    f32 = [x.astype(jnp.float32) for x in lps]
    got, _ = jax.jit(lambda l, E_, a_: dp.deepen_combine(l, E_, a_, w.astype(jnp.float32), scale=30.0,
                                                         mode="chunked", chunk=64))(
        f32, [E.astype(jnp.float32), E2.astype(jnp.float32)], [a, a2])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.exp(np.asarray(got)), np.exp(np.asarray(ref)), atol=2e-5)


@pytest.mark.no_typecheck
def test_bad_shapes():
    E, a, z = _data()
    with pytest.raises(ValueError, match="embedding rows"):
        dp.relative_chunked(jax.nn.softmax(z[:, :-1], -1), E, a)
    with pytest.raises(ValueError, match="same anchors"):
        dp.deepen_combine([z, z], [E, E], [a, a[:-1]], jnp.asarray([0.5, 0.5]))


@pytest.mark.parametrize("chunk", [None, 1000, 7])
def test_chunk_sizes_match_dense(chunk):
    """The default chunk (``default_chunk(A)``), a chunk longer than V and one that leaves a shifted
    last chunk all give the dense products."""
    E, a, z = _data(9)
    p = jax.nn.softmax(z, -1)
    R = np.asarray(dp.dense_relative_matrix(E, a, 20.0))
    np.testing.assert_allclose(np.asarray(dp.relative_chunked(p, E, a, 20.0, chunk=chunk)), np.asarray(p) @ R,
                               rtol=1e-12, atol=1e-14)
    g = jnp.asarray(np.random.default_rng(10).random((B, A)))
    np.testing.assert_allclose(np.asarray(dp.relative_rmatvec_chunked(g, E, a, 20.0, chunk=chunk)),
                               np.asarray(g) @ R.T, rtol=1e-12, atol=1e-14)


def test_chunked_step_memory_under_one_eighth_of_dense():
    """XLA's compiled memory analysis (arguments + outputs + temporaries; nothing is allocated) of
    one DeePEn step: the chunked form needs <= 1/8 of the dense form's peak (V=16384, A=1024)."""
    Vm, Va, d, A_, Bm = 16384, 8192, 64, 1024, 2
    S = jax.ShapeDtypeStruct
    f32 = jnp.float32
    args = ((S((Bm, Vm), f32), S((Bm, Va), f32)), (S((Vm, d), f32), S((Va, d), f32)),
            (S((A_,), jnp.int32), S((A_,), jnp.int32)))
    w = jnp.asarray([0.5, 0.5], f32)

    def dense(lps, Es, As):
        rs = [jnp.exp(lp) @ dp.dense_relative_matrix(E, a_) for lp, E, a_ in zip(lps, Es, As)]
        return jax.nn.softmax(dp.dense_inverse(lps[0], w[0] * rs[0] + w[1] * rs[1], Es[0], As[0]), -1)

    def chunked(lps, Es, As):
        return dp.deepen_combine(list(lps), list(Es), list(As), w, mode="chunked")[0]

    peaks = []
    for f in (dense, chunked):
        m = jax.jit(f).lower(*args).compile().memory_analysis()
        if m is None:
            pytest.skip("this backend gives no memory analysis")
        peaks.append(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    assert peaks[0] > Vm * A_ * 4  # the dense R exists
    assert peaks[1] <= peaks[0] / 8, peaks
