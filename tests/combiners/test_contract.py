"""The status contract every combiner follows (issue 19): no NaN distribution, a status per row
naming unusable input (NaN / +inf / a member row that is -inf everywhere) and the member, and one
weights check (same message) for every combiner, same- and cross-vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxens
from jaxens import make_problem
from jaxens.combiners.bat import bat_logits, bat_solve, bat_token_mask
from jaxens.combiners.base import check_weights, unusable_members
from jaxens.combiners.bottleneck import bottleneck
from jaxens.combiners.mixture import me, me_step
from jaxens.solvers.solution import Status
from jaxens.vocab.deepen import DeePEn
from jaxens.vocab.me_cross import MECross
from jaxens.vocab.safe import SAFE
from jaxens.vocab.union import GaC
from jaxens.vocab.unite import UniTE

V, D = 24, 4


def _random_rows(seed: int, n: int, B: int, kinds: list[str]) -> list[jax.Array]:
    """Member logits ``(B, v)`` each; row b of member ``b % n`` is spoilt by ``kinds[b]``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, B, V)) * 3.0
    for b, kind in enumerate(kinds):
        i = b % n
        if kind == "ninf_row":
            x[i, b] = -np.inf
        elif kind == "nan_row":
            x[i, b] = np.nan
        elif kind == "nan_one":
            x[i, b, rng.integers(V)] = np.nan
        elif kind == "posinf":
            x[i, b, rng.integers(V)] = np.inf
        elif kind == "masked":
            x[i, b, rng.random(V) < 0.5] = -np.inf
        elif kind == "all_members_bad":
            x[:, b] = -np.inf
    return [jnp.asarray(xi, jnp.float32) for xi in x]


KINDS = ["ok", "ninf_row", "nan_row", "nan_one", "posinf", "masked", "all_members_bad"]


_RUNNER = []
_AVERAGING = {}


def _averaging_runner(factory):
    """``(w, logits) -> combine`` jitted once per factory (traced weights: only their shape is checked)."""
    if factory not in _AVERAGING:
        _AVERAGING[factory] = jax.jit(lambda w, x: factory(w).combine(x, None))
    return _AVERAGING[factory]


def _bottleneck_runner():
    """One bottleneck combiner (two members, member 0 hard) and its jitted combine: one compile."""
    if not _RUNNER:
        rng = np.random.default_rng(0)
        Ws = [jnp.asarray(rng.normal(size=(V, D)), jnp.float32) for _ in range(2)]
        comb = bottleneck(make_problem(Ws, hard=(0,)), "kl")
        _RUNNER.append((comb, jax.jit(comb.combine)))
    return _RUNNER[0]


def _check(logp, status, bad_expected):
    logp = np.asarray(logp)
    assert not np.any(np.isnan(logp)), "a NaN distribution"
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-5)
    status = np.asarray(status)
    np.testing.assert_array_equal(status == Status.NONFINITE_INPUT, bad_expected.any(-1))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), kinds=st.lists(st.sampled_from(KINDS), min_size=6, max_size=6),
       n=st.integers(1, 3))
def test_averaging_status_contract_property(seed, kinds, n):
    x = _random_rows(seed, n, len(kinds), kinds)
    bad = np.asarray(unusable_members(x))
    w = np.random.default_rng(seed).uniform(0.1, 1.0, size=n)
    for factory in (jaxens.logit_average, jaxens.prob_average):
        logp, _, info = _averaging_runner(factory)(jnp.asarray(w, jnp.float32), x)
        _check(logp, info.status, bad)
        np.testing.assert_array_equal(np.asarray(info.bad_members), bad)
        for b in np.flatnonzero(bad.any(-1) & ~bad.all(-1)):  # the usable members' combination
            keep = [i for i in range(n) if not bad[b, i]]
            ref_comb = factory(w[keep])
            want, _, _ = ref_comb.combine([x[i][b : b + 1] for i in keep], None)
            np.testing.assert_allclose(np.asarray(logp[b]), np.asarray(want[0]), atol=1e-5)
        for b in np.flatnonzero(bad.all(-1)):  # nothing usable: uniform
            np.testing.assert_allclose(np.asarray(logp[b]), -np.log(V), atol=1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), kinds=st.lists(st.sampled_from(KINDS), min_size=4, max_size=4))
def test_bottleneck_status_contract_property(seed, kinds):
    x = _random_rows(seed, 2, len(kinds), kinds)
    comb, run = _bottleneck_runner()
    logp, _, sol = run(x, comb.init(len(kinds)))
    _check(logp, sol.status, np.asarray(unusable_members(x)))


def test_logit_average_disjoint_supports_is_infeasible_not_nan():
    a = jnp.array([[0.0, 1.0, -jnp.inf, -jnp.inf]])
    b = jnp.array([[-jnp.inf, -jnp.inf, 0.0, 2.0]])
    logp, _, info = jaxens.logit_average().combine([a, b], None)
    assert np.asarray(info.status).tolist() == [Status.INFEASIBLE]
    want, _, _ = jaxens.prob_average().combine([a, b], None)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(want), atol=1e-6)


def test_me_step_unusable_row_is_uniform_and_flagged():
    B = 3
    table = jnp.stack([jnp.zeros((B, V)).at[0].set(-jnp.inf).at[1, 2].set(jnp.nan)] * 2)

    def forward(j, T, cache, start, logits="all"):
        return (None if logits == "none" else table[j][:, None, :]), cache

    ens = me()
    caches = (jnp.zeros(()), jnp.zeros(()))
    logp, _, _, info = me_step(ens, forward, caches, jnp.array([4, 4]), jnp.array(5), jax.random.key(0), (B, V))
    assert not np.any(np.isnan(np.asarray(logp)))
    np.testing.assert_allclose(np.asarray(logp[:2]), -np.log(V), atol=1e-6)
    assert np.asarray(info.nonfinite).tolist() == [True, True, False]
    stats = ens.update_stats(ens.init_stats(2), info)
    assert int(stats.nonfinite_draws[int(info.member)]) == 1 and int(stats.nonfinite_draws.sum()) == 1


def test_bat_unusable_logits_sample_uniform_never_nan():
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    P = make_problem([W], hard="all")
    l = W @ jnp.asarray(rng.normal(size=(D,)), jnp.float32)
    for x in (l.at[0].set(jnp.nan), jnp.full((V,), -jnp.inf), l.at[3].set(jnp.inf)):
        p_hat = jax.nn.softmax(x)
        cand = jnp.arange(4, dtype=jnp.int32)
        m = P.moments(p_hat[None])
        assert np.all(np.asarray(bat_solve(P, p_hat, m, cand).status) == Status.NONFINITE_INPUT)
        out = np.asarray(bat_logits(x, bat_token_mask(P, p_hat, m, cand)))
        np.testing.assert_array_equal(out, np.zeros(V))  # uniform


# ----------------------------------------------------------------------------------------------
# one weights check, one message
# ----------------------------------------------------------------------------------------------
_P2 = make_problem([jnp.eye(V, D), jnp.eye(V, D)[::-1]], hard="all")
FACTORIES = {
    "logit_average": lambda w: jaxens.logit_average(w),
    "prob_average": lambda w: jaxens.prob_average(w),
    "bottleneck": lambda w: bottleneck(_P2, "kl", weights=jnp.asarray(w, jnp.float32)),
    "ME": lambda w: me(w),
    "gac": lambda w: GaC(weights=w),
    "unite": lambda w: UniTE(weights=w),
    "me": lambda w: MECross(weights=w),
    "safe": lambda w: SAFE(weights=tuple(w)),
    "deepen": lambda w: DeePEn(weights=tuple(w)),
}
BAD = {"a weight is negative": [1.0, -1.0], "all weights are zero": [0.0, 0.0],
       "a weight is NaN or infinite": [float("nan"), 1.0]}


@pytest.mark.no_typecheck
@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("problem", sorted(BAD))
def test_every_combiner_rejects_bad_weights_at_construction(name, problem):
    with pytest.raises(ValueError) as e:
        FACTORIES[name](BAD[problem])
    msg = str(e.value)
    assert msg.startswith(f"{name}: weights must be finite, >= 0 and not all zero ({problem})"), msg
    assert "pass one finite weight >= 0 per member" in msg


@pytest.mark.no_typecheck
def test_wrong_number_of_weights_names_both_counts():
    x = [jnp.zeros((1, V))] * 2
    for comb in (jaxens.logit_average([1.0, 1.0, 1.0]), jaxens.prob_average([1.0])):
        with pytest.raises(ValueError, match=r"has \d weights but the ensemble has 2 members"):
            comb.combine(x, None)
    with pytest.raises(ValueError, match=r"bottleneck has 1 weights but the ensemble has 2 members"):
        bottleneck(_P2, "kl", weights=jnp.ones(1))
    with pytest.raises(ValueError, match=r"--weights has 3 weights but the ensemble has 2 members"):
        check_weights([1, 1, 1], 2, owner="--weights")


def test_traced_weights_are_checked_by_shape_only_and_stay_differentiable():
    x = [jax.random.normal(jax.random.key(i), (2, V)) for i in range(2)]
    g = jax.grad(lambda w: jaxens.prob_average(w).combine(x, None)[0][0, 3])(jnp.array([0.3, 0.7]))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.no_typecheck
def test_bottleneck_rejects_negative_rho():
    P = make_problem([jnp.eye(V, D), jnp.eye(V, D)[::-1]], hard=(0,), soft=(1,))
    for rho in (-1.0, [1.0, -0.5], float("nan")):
        with pytest.raises(ValueError, match=r"rho \(soft-constraint strength\) must be finite and >= 0"):
            bottleneck(P, "kl", rho=rho)
