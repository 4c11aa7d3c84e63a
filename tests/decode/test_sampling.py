"""Samplers: exact truncated distributions (vs a NumPy reference), statistics, edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxens.sampling import Sampler, apply_mask, greedy, min_p_mask, top_k_mask, top_p_mask


def ref_truncated(logp, temperature=1.0, top_k=None, top_p=None, min_p=None, mask=None):
    """NumPy reference of the HF warper chain on one row (ties kept)."""
    x = np.asarray(logp, np.float64).copy()
    if mask is not None and np.any(np.isfinite(x[mask])):
        x[~mask] = -np.inf
    x = x / temperature
    if top_k is not None and top_k < x.size:
        kth = np.sort(x)[::-1][top_k - 1]
        x[x < kth] = -np.inf
    if top_p is not None and top_p < 1:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - np.max(x))
        p /= p.sum()
        before = np.cumsum(p) - p
        keep = before < top_p
        keep[0] = True
        thr = x[order][keep].min()
        x[x < thr] = -np.inf
    if min_p is not None and min_p > 0:
        p = np.exp(x - np.max(x))
        x[p < min_p * p.max()] = -np.inf
    q = np.exp(x - np.max(x))
    return q / q.sum()


CONFIGS = [
    dict(),
    dict(temperature=0.5),
    dict(temperature=1.7, top_k=5),
    dict(top_p=0.8),
    dict(temperature=0.8, top_p=0.6),
    dict(min_p=0.1),
    dict(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05),
]


@pytest.fixture(scope="module")
def logp():
    x = jax.random.normal(jax.random.key(0), (3, 40)) * 1.5
    return jax.nn.log_softmax(x, axis=-1)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_probs_match_reference(logp, cfg):
    got = np.asarray(Sampler(**cfg).probs(logp))
    for b in range(logp.shape[0]):
        np.testing.assert_allclose(got[b], ref_truncated(logp[b], **cfg), atol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_sample_frequencies_chi_square(logp, cfg):
    sampler = Sampler(**cfg)
    row = logp[1]
    n = 20000
    tokens = np.asarray(jax.jit(sampler)(jnp.broadcast_to(row, (n, row.size)), jax.random.key(1)))
    expected = ref_truncated(row, **cfg)
    counts = np.bincount(tokens, minlength=row.size)
    assert counts[expected == 0].sum() == 0, "sampled a truncated token"
    support = expected > 0
    if support.sum() > 1:
        _, pval = stats.chisquare(counts[support], n * expected[support] / expected[support].sum())
        assert pval > 1e-4, (cfg, pval)


def test_external_mask_and_empty_mask_fallback(logp):
    mask = np.zeros(logp.shape, bool)
    mask[0, [3, 7, 11]] = True
    mask[1, :] = True  # everything allowed
    # row 2 allows nothing: the mask is ignored for that row
    s = Sampler()
    got = np.asarray(s.probs(logp, jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], ref_truncated(logp[0], mask=mask[0]), atol=1e-6)
    assert set(np.nonzero(got[0])[0]) == {3, 7, 11}
    np.testing.assert_allclose(got[1], np.exp(logp[1]), atol=1e-6)
    np.testing.assert_allclose(got[2], np.exp(logp[2]), atol=1e-6)
    tok = np.asarray(Sampler(greedy=True)(logp, jax.random.key(0), jnp.asarray(mask)))
    assert tok[0] == [3, 7, 11][int(np.argmax(np.asarray(logp[0])[[3, 7, 11]]))]
    # a mask that leaves only -inf tokens is treated as empty too
    m2 = np.zeros(logp.shape, bool)
    m2[:, 0] = True
    x = logp.at[:, 0].set(-jnp.inf)
    assert np.all(np.isfinite(np.asarray(apply_mask(x, jnp.asarray(m2))).max(-1)))


def test_neg_inf_logits_never_sampled():
    x = jnp.array([[0.0, -jnp.inf, 1.0, -jnp.inf, 0.5]] * 5000)
    for cfg in [dict(), dict(top_k=4), dict(top_k=10), dict(top_p=1.0), dict(top_p=0.999), dict(min_p=0.0)]:
        t = np.asarray(Sampler(**cfg)(x, jax.random.key(3)))
        assert not np.any((t == 1) | (t == 3)), cfg
        assert set(np.unique(t)) == {0, 2, 4}, cfg
    assert int(greedy()(x, jax.random.key(0))[0]) == 2
    # a row with a single finite entry
    y = jnp.array([[-jnp.inf, -jnp.inf, 2.0]])
    for cfg in CONFIGS + [dict(greedy=True)]:
        assert int(Sampler(**cfg)(y, jax.random.key(0))[0]) == 2


def test_ties():
    x = jnp.log(jnp.array([[0.3, 0.3, 0.3, 0.1]]))
    assert np.asarray(top_k_mask(x, 1)).tolist() == [[True, True, True, False]]  # ties at the k-th kept
    assert np.asarray(top_k_mask(x, 3)).tolist() == [[True, True, True, False]]
    assert np.asarray(top_p_mask(x, 0.1)).tolist() == [[True, True, True, False]]  # ties with the last kept
    assert np.asarray(top_p_mask(x, 0.95)).tolist() == [[True] * 4]
    assert np.asarray(min_p_mask(x, 0.5)).tolist() == [[True, True, True, False]]
    assert int(greedy()(x, jax.random.key(0))[0]) == 0  # first index on ties


def test_k_ge_v_and_p_one_are_identity(logp):
    for cfg in [dict(top_k=40), dict(top_k=1000), dict(top_p=1.0), dict(min_p=0.0)]:
        np.testing.assert_allclose(np.asarray(Sampler(**cfg).probs(logp)), np.exp(np.asarray(logp)), atol=1e-6)
    assert Sampler(top_p=1.0, min_p=0.0).is_plain
    assert not Sampler(top_k=1000).is_plain  # a top-k is treated as truncating even if k >= v


def test_greedy_is_argmax_and_ignores_temperature(logp):
    for t in [0.3, 1.0, 3.0]:
        tok = Sampler(greedy=True, temperature=t)(logp, jax.random.key(5))
        np.testing.assert_array_equal(np.asarray(tok), np.argmax(np.asarray(logp), -1))


def test_top_k_one_is_greedy(logp):
    tok = Sampler(top_k=1)(logp, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(np.asarray(logp), -1))


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_k=0), "top_k must be an int >= 1"),
        (dict(top_k=2.5), "top_k must be an int >= 1"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
        (dict(greedy=1), "greedy must be a bool"),
    ],
)
@pytest.mark.no_typecheck
def test_constructor_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Sampler(**kw)


@pytest.mark.no_typecheck
def test_shape_errors(logp):
    with pytest.raises(ValueError, match=r"shape \(B, v\)"):
        Sampler()(logp[0], jax.random.key(0))
    with pytest.raises(ValueError, match="mask must have the shape"):
        Sampler()(logp, jax.random.key(0), jnp.ones((3, 5), bool))


def test_sampler_is_hashable_and_jittable(logp):
    s1, s2 = Sampler(top_k=3), Sampler(top_k=3)
    assert hash(s1) == hash(s2) and s1 == s2
    f = jax.jit(lambda lp, k: s1(lp, k))
    assert f(logp, jax.random.key(0)).shape == (3,)
