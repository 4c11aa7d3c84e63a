"""Bottleneck instances built from a real model's rows, checked against HiGHS and cvxpy.

SmolLM2-135M reads real text (alice29.txt).  At a position t, the sub-vocabulary V' is the 400
tokens the model finds most likely; its real unembedding rows W[V'] (400 x 576) are reduced to
their principal directions, and member i owns 12 of them (a real, tight bottleneck: n*d << v).
Member i's distribution is the maximum-entropy fit, in its own directions, of the model's real
next-token distribution at t (renormalised on V'), so the exact problem is feasible; a second
instance gives member 2 the real distribution at t+1 instead, which no distribution need share,
and the infeasibility verdict is checked against HiGHS.
"""

import cvxpy as cp
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

import jaxens
from jaxens.combiners.bottleneck import bottleneck
from jaxens.models.forward import full_logits
from jaxens.solvers.solution import Status
from test_bottleneck import _fit, _lse

pytestmark = [pytest.mark.models, pytest.mark.x64]

K, DIRS = 400, 12


@pytest.fixture(scope="module")
def real_rows(smollm2, smollm2_tokenizer, alice_text):
    ids = smollm2_tokenizer.encode(alice_text[2000:2400])[:48]
    logits = np.asarray(full_logits(smollm2, jnp.asarray([ids]))[0], np.float64)  # (T, V)
    W, _ = smollm2.unembedding()
    W = np.asarray(W, np.float64)
    t = 40
    top = np.argsort(-logits[t])[:K]
    Wk = W[top]
    Wk = Wk - Wk.mean(0)
    _, _, Vt = np.linalg.svd(Wk, full_matrices=False)
    Ws = [Wk @ Vt[i * DIRS : (i + 1) * DIRS].T for i in range(3)]
    p_t = np.exp(logits[t, top] - _lse(logits[t, top]))
    p_t1 = np.exp(logits[t + 1, top] - _lse(logits[t + 1, top]))
    return Ws, p_t, p_t1




def _combine(Ws, member_logits, objective):
    P = jaxens.make_problem(Ws, dtype=jnp.float64)
    comb = bottleneck(P, objective)
    _, _, sol = comb.combine([jnp.asarray(l[None]) for l in member_logits], comb.init(1))
    return np.asarray(sol.p[0]), sol


def _moments(Ws, member_logits):
    probs = [np.exp(l - _lse(l)) for l in member_logits]
    A = np.concatenate(Ws + [np.ones((K, 1))], axis=1)
    b = np.concatenate([W.T @ q for W, q in zip(Ws, probs)] + [[1.0]])
    return probs, A, b


def test_real_rows_lp_and_kl_match_references(real_rows):
    Ws, p_t, _ = real_rows
    member_logits = [W @ _fit(W, p_t) for W in Ws]
    probs, A, b = _moments(Ws, member_logits)
    c = -np.mean([np.log(q) for q in probs], axis=0)
    ref = linprog(c, A_eq=A.T, b_eq=b, bounds=(0, None), method="highs")
    assert ref.status == 0
    p, sol = _combine(Ws, member_logits, "sum_ce")
    assert int(sol.status[0]) == Status.SOLVED
    assert abs(c @ p - ref.fun) <= 1e-4 * abs(ref.fun)
    assert np.max(np.abs(A.T @ p - b)) <= 1e-5

    theta = -c
    q = cp.Variable(K, nonneg=True)
    cp.Problem(cp.Minimize(-cp.sum(cp.entr(q)) - theta @ q), [A.T @ q == b]).solve(solver=cp.CLARABEL)
    value = lambda x: np.sum(x[x > 0] * np.log(x[x > 0])) - theta @ x  # noqa: E731
    pk, solk = _combine(Ws, member_logits, "kl")
    assert int(solk.status[0]) == Status.SOLVED
    assert abs(value(pk) - value(q.value)) <= 1e-4 * max(1.0, abs(value(q.value)))
    assert np.max(np.abs(A.T @ pk - b)) <= 1e-5


def test_real_rows_infeasibility_verdict_matches_highs(real_rows):
    Ws, p_t, p_t1 = real_rows
    member_logits = [Ws[0] @ _fit(Ws[0], p_t), Ws[1] @ _fit(Ws[1], p_t1), Ws[2] @ _fit(Ws[2], p_t)]
    probs, A, b = _moments(Ws, member_logits)
    ref = linprog(np.zeros(K), A_eq=A.T, b_eq=b, bounds=(0, None), method="highs")
    assert ref.status == 2  # the real t / t+1 moments are incompatible here (deterministic)
    p, sol = _combine(Ws, member_logits, "kl")
    assert (ref.status == 2) == (int(sol.status[0]) == Status.INFEASIBLE), (ref.status, sol.status)
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-9
    if ref.status == 2:
        d = np.asarray(sol.certificate[0])
        m = b[:-1]
        assert d @ m - np.max(np.concatenate(Ws, axis=1) @ d) > 0
