"""The bottleneck combiner end to end: every objective against a reference solver (float64).

Instances: members i with unembeddings W_i and logits l_i = W_i h_i + e_i whose softmax is the
maximum-entropy fit of a common "true" p* (so A_i^T p_hat_i = A_i^T p* and the exact problem is
feasible), fitted with scipy.  The fixed offsets e_i matter: with exact logits W_i h_i (+ a bias
column in A) the cost -sum_i p.log p_hat_i = -sum_i h_i^T W_i^T p + const is *constant* on the
all-hard feasible set, so every feasible p would be optimal for sum_ce / sum_sq_ce and the
comparison with HiGHS would test nothing. infeasible instances use members with independent h_i and are
checked against HiGHS's verdict.  References: HiGHS (LPs), cvxpy/Clarabel (QP, entropic,
log objectives).  Tolerances: objective within 1e-4 relative, ||A^T p - m||_inf <= 1e-5.
"""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog, minimize

import jaxens
from jaxens import objectives as obj_mod
from jaxens.combiners.bottleneck import bottleneck
from jaxens.solvers.solution import Status

V = 60
DIMS = (4, 5, 3)


def _lse(x):
    mx = np.max(x)
    return mx + np.log(np.sum(np.exp(x - mx)))


def _fit(W, target, e=None):
    """h maximising the entropy of softmax(W h + e) subject to W^T softmax(W h + e) = W^T target."""
    mt = W.T @ target
    e = np.zeros(W.shape[0]) if e is None else e

    def f(h):
        lg = W @ h + e
        return _lse(lg) - h @ mt, W.T @ np.exp(lg - _lse(lg)) - mt

    return minimize(f, np.zeros(W.shape[1]), jac=True, method="BFGS", options=dict(gtol=1e-12, maxiter=5000)).x


def feasible_instance(seed):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(V, d)) for d in DIMS]
    t = 2.0 * rng.normal(size=V)
    pstar = np.exp(t - _lse(t))
    es = [rng.normal(size=V) for _ in Ws]
    logits = [W @ _fit(W, pstar, e) + e for W, e in zip(Ws, es)]
    return Ws, logits, pstar


def infeasible_instance(seed):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(V, 20)) for _ in range(3)]
    logits = [W @ (0.5 * rng.normal(size=20)) for W in Ws]
    return Ws, logits


def _solve(Ws, logits, objective, **kw):
    P = jaxens.make_problem(Ws, dtype=jnp.float64, hard=kw.pop("hard", "all"), soft=kw.pop("soft", None))
    comb = bottleneck(P, objective, **kw)
    x = [jnp.asarray(l[None], jnp.float64) for l in logits]
    logp, _, sol = jax.jit(comb.combine)(x, comb.init(1))
    return P, np.asarray(sol.p[0]), sol, np.asarray(logp[0])


def _members(logits):
    lp = np.stack([l - _lse(l) for l in logits])
    return lp, np.exp(lp)


def _constraints(p, Ws, probs):
    return [W.T @ p == W.T @ q for W, q in zip(Ws, probs)] + [cp.sum(p) == 1]


pytestmark = pytest.mark.x64


@pytest.mark.parametrize("seed", [0, 1])
def test_sum_ce_matches_highs(seed):
    Ws, logits, _ = feasible_instance(seed)
    lp, probs = _members(logits)
    c = -lp.mean(0)
    A = np.concatenate(Ws + [np.ones((V, 1))], axis=1)
    b = np.concatenate([W.T @ q for W, q in zip(Ws, probs)] + [[1.0]])
    ref = linprog(c, A_eq=A.T, b_eq=b, bounds=(0, None), method="highs")
    assert ref.status == 0
    # the instance is not degenerate: the cost varies over the feasible set by far more than the
    # tolerance, so a solver returning an arbitrary feasible point fails this test
    worst = linprog(-c, A_eq=A.T, b_eq=b, bounds=(0, None), method="highs")
    assert -worst.fun - ref.fun > 1e-2 * abs(ref.fun)
    P, p, sol, _ = _solve(Ws, logits, "sum_ce")
    assert int(sol.status[0]) == Status.SOLVED
    assert abs(c @ p - ref.fun) <= 1e-4 * abs(ref.fun)
    assert np.max(np.abs(A.T @ p - b)) <= 1e-5
    assert p.min() >= -1e-12


@pytest.mark.parametrize(
    "objective",
    ["sum_sq_ce", "kl", "max_entropy", "cross_entropy"],
)
def test_smooth_objectives_match_cvxpy(objective):
    Ws, logits, _ = feasible_instance(3)
    lp, probs = _members(logits)
    w = np.full(3, 1 / 3)
    p = cp.Variable(V, nonneg=True)
    if objective == "sum_sq_ce":
        expr = cp.sum_squares(lp @ p) / 3
        value = lambda q: np.sum((lp @ q) ** 2) / 3  # noqa: E731
    elif objective == "kl":
        theta = w @ lp
        expr = -cp.sum(cp.entr(p)) - theta @ p
        value = lambda q: np.sum(q[q > 0] * np.log(q[q > 0])) - theta @ q  # noqa: E731
    elif objective == "max_entropy":
        expr = -cp.sum(cp.entr(p))
        value = lambda q: np.sum(q[q > 0] * np.log(q[q > 0]))  # noqa: E731
    else:
        s = w @ probs
        expr = -s @ cp.log(p)
        value = lambda q: -s @ np.log(q)  # noqa: E731
    prob = cp.Problem(cp.Minimize(expr), _constraints(p, Ws, probs))
    prob.solve(solver=cp.CLARABEL)
    ref = value(np.maximum(p.value, 1e-300))
    P, pj, sol, _ = _solve(Ws, logits, objective)
    assert int(sol.status[0]) == Status.SOLVED, sol.status
    got = value(pj)
    assert abs(got - ref) <= 1e-4 * max(1.0, abs(ref)), (got, ref)
    A = np.concatenate(Ws, axis=1)
    assert np.max(np.abs(A.T @ pj - np.concatenate([W.T @ q for W, q in zip(Ws, probs)]))) <= 1e-5


def test_min_underestimation_matches_highs():
    Ws, logits, _ = feasible_instance(4)
    lp, probs = _members(logits)
    r = probs.min(0)
    # variables (p, s): min s  s.t. A^T p = b, p - s r <= 0, p >= 0
    A = np.concatenate(Ws + [np.ones((V, 1))], axis=1)
    b = np.concatenate([W.T @ q for W, q in zip(Ws, probs)] + [[1.0]])
    A_eq = np.concatenate([A.T, np.zeros((A.shape[1], 1))], axis=1)
    A_ub = np.concatenate([np.eye(V), -r[:, None]], axis=1)
    cost = np.zeros(V + 1)
    cost[-1] = 1.0
    ref = linprog(cost, A_ub=A_ub, b_ub=np.zeros(V), A_eq=A_eq, b_eq=b, bounds=(0, None), method="highs")
    assert ref.status == 0
    P, p, sol, _ = _solve(Ws, logits, "min_underestimation")
    got = np.max(p / r)
    assert abs(got - ref.fun) <= 1e-4 * ref.fun, (got, ref.fun)
    assert np.max(np.abs(A.T @ p - b)) <= 1e-5


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_infeasible_rows_flagged_exactly_when_highs_says_so(seed):
    Ws, logits = infeasible_instance(seed)
    lp, probs = _members(logits)
    A = np.concatenate(Ws + [np.ones((V, 1))], axis=1)
    b = np.concatenate([W.T @ q for W, q in zip(Ws, probs)] + [[1.0]])
    ref = linprog(np.zeros(V), A_eq=A.T, b_eq=b, bounds=(0, None), method="highs")
    P, p, sol, _ = _solve(Ws, logits, "kl")
    assert (ref.status == 2) == (int(sol.status[0]) == Status.INFEASIBLE)
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-9 and p.min() >= -1e-12
    if ref.status == 2:
        d = np.asarray(sol.certificate[0])
        Afull = np.asarray(P.A)
        m = np.concatenate([W.T @ q for W, q in zip(Ws, probs)])
        assert d @ m - np.max(Afull @ d) > 0  # a valid Farkas certificate


def test_least_squares_matches_cvxpy():
    Ws, logits = infeasible_instance(5)
    lp, probs = _members(logits)
    A = np.concatenate(Ws, axis=1)
    m = np.concatenate([W.T @ q for W, q in zip(Ws, probs)])
    p = cp.Variable(V, nonneg=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A.T @ p - m)), [cp.sum(p) == 1])
    prob.solve(solver=cp.CLARABEL)
    P, pj, sol, _ = _solve(Ws, logits, "least_squares")
    got = np.sum((A.T @ pj - m) ** 2)
    assert abs(got - prob.value) <= 1e-4 * max(prob.value, 1e-8), (got, prob.value)


def test_subset_constraints_always_feasible_and_soft_matches_cvxpy():
    Ws, logits = infeasible_instance(6)
    lp, probs = _members(logits)
    # only member 1's moments as hard constraints: p_hat_1 itself is feasible
    _, p, sol, _ = _solve(Ws, logits, "kl", hard=(1,))
    assert int(sol.status[0]) == Status.SOLVED
    assert np.max(np.abs(Ws[1].T @ (p - probs[1]))) <= 1e-5
    # soft constraints on members 0 and 2 with weights rho, hard on member 1
    rho = np.array([0.7, 0.0, 2.0])
    theta = lp.mean(0)
    q = cp.Variable(V, nonneg=True)
    expr = -cp.sum(cp.entr(q)) - theta @ q + sum(
        rho[i] / 2 * cp.sum_squares(Ws[i].T @ q - Ws[i].T @ probs[i]) for i in (0, 2)
    )
    cons = [Ws[1].T @ q == Ws[1].T @ probs[1], cp.sum(q) == 1]
    cp.Problem(cp.Minimize(expr), cons).solve(solver=cp.CLARABEL)

    def value(x):
        x = np.maximum(x, 1e-300)
        return np.sum(x * np.log(x)) - theta @ x + sum(
            rho[i] / 2 * np.sum((Ws[i].T @ (x - probs[i])) ** 2) for i in (0, 2)
        )

    _, p2, sol2, _ = _solve(Ws, logits, "kl", hard=(1,), soft=(0, 2), rho=jnp.asarray(rho))
    assert int(sol2.status[0]) == Status.SOLVED
    assert abs(value(p2) - value(q.value)) <= 1e-4 * max(1.0, abs(value(q.value)))


def test_masked_tokens_nan_rows_and_batch():
    Ws, logits, _ = feasible_instance(8)
    x = np.stack([np.stack(logits)] * 3)  # (B=3, n, v)
    x[1, 0, 7] = -np.inf  # member 0 rules token 7 out in row 1
    x[2, 1, 3] = np.nan  # row 2 is non-finite
    P = jaxens.make_problem(Ws, dtype=jnp.float64, hard=())
    comb = bottleneck(P, "kl")
    logp, state, sol = jax.jit(comb.combine)([jnp.asarray(x[:, i]) for i in range(3)], comb.init(3))
    p = np.exp(np.asarray(logp))
    assert np.all(np.isfinite(np.asarray(sol.p)))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-9)
    assert p[1, 7] == 0.0
    assert int(sol.status[2]) == Status.NONFINITE_INPUT
    assert list(np.asarray(sol.status[:2])) == [Status.SOLVED, Status.SOLVED]
    # with no hard constraints the KL objective is exactly logit averaging
    la = np.exp(np.asarray(jaxens.logit_average().combine([jnp.asarray(x[0, i])[None] for i in range(3)], None)[0]))
    np.testing.assert_allclose(p[0], la[0], atol=1e-9)


def test_vocab_mismatch_error_names_both_shapes():
    Ws, logits, _ = feasible_instance(0)
    P = jaxens.make_problem(Ws)
    comb = bottleneck(P, "kl")
    with pytest.raises(ValueError, match=r"vocabulary size 59.*v=60"):
        comb.combine([jnp.zeros((1, 59))] * 3, comb.init(1))
    with pytest.raises(ValueError, match="unknown bottleneck objective"):
        bottleneck(P, "nope")


def test_smoothing_keeps_support_and_gradient_wrt_lambda_and_logits():
    Ws, logits, _ = feasible_instance(9)
    P = jaxens.make_problem(Ws, dtype=jnp.float64)

    def loss(lam, l0):
        comb = bottleneck(P, "kl", lam=lam)
        logp, _, _ = comb.combine([l0[None]] + [jnp.asarray(l)[None] for l in logits[1:]], comb.init(1))
        return logp[0, 11]

    l0 = jnp.asarray(logits[0])
    g_lam, g_l0 = jax.grad(loss, argnums=(0, 1))(jnp.asarray(0.3), l0)
    e = 1e-6
    fd = (loss(jnp.asarray(0.3 + e), l0) - loss(jnp.asarray(0.3 - e), l0)) / (2 * e)
    assert abs(float(g_lam) - float(fd)) <= 1e-5 * max(1.0, abs(float(fd)))
    dirn = jnp.asarray(np.random.default_rng(0).normal(size=V))
    fd2 = (loss(jnp.asarray(0.3), l0 + e * dirn) - loss(jnp.asarray(0.3), l0 - e * dirn)) / (2 * e)
    assert abs(float(g_l0 @ dirn) - float(fd2)) <= 1e-4 * max(1.0, abs(float(fd2)))


def test_objective_row_data_masks():
    lg = jnp.array([[0.0, -jnp.inf, 1.0, -jnp.inf], [0.0, 1.0, -jnp.inf, -jnp.inf]])
    w = jnp.array([0.5, 0.5])
    strict = obj_mod.row_data("sum_ce", lg, w)
    loose = obj_mod.row_data("cross_entropy", lg, w)
    assert list(np.asarray(strict.mask)) == [True, False, False, False]
    assert list(np.asarray(loose.mask)) == [True, True, True, False]


def test_feasibility_first_mixed_batch():
    """Several hard members: the least-squares phase runs first; in a batch of a feasible and an
    infeasible row the feasible one keeps the objective's answer (as without the check) and the
    infeasible one returns the least-squares distribution with a valid certificate (HiGHS decides)."""
    Ws, logits, _ = feasible_instance(0)
    rng = np.random.default_rng(11)
    bad = [5.0 * rng.normal(size=V) for _ in Ws]  # each member its own sharp distribution
    lp, probs = _members(bad)
    A = np.concatenate(Ws + [np.ones((V, 1))], axis=1)
    b = np.concatenate([W.T @ q for W, q in zip(Ws, probs)] + [[1.0]])
    ref = linprog(np.zeros(V), A_eq=A.T, b_eq=b, bounds=(0, None), method="highs")
    assert ref.status == 2  # the second row is infeasible
    P = jaxens.make_problem(Ws, dtype=jnp.float64, hard="all")
    x = [jnp.asarray(np.stack([g, h_])) for g, h_ in zip(logits, bad)]
    comb = bottleneck(P, "kl", warm_start=False)
    _, _, sol = jax.jit(comb.combine)(x, comb.init(2))
    plain = bottleneck(P, "kl", warm_start=False, check_feasibility=False)
    _, _, sol0 = jax.jit(plain.combine)(x, plain.init(2))
    assert [int(s) for s in sol.status] == [Status.SOLVED, Status.INFEASIBLE]
    np.testing.assert_allclose(np.asarray(sol.p[0]), np.asarray(sol0.p[0]), atol=1e-12)
    d = np.asarray(sol.certificate[1])
    m = np.concatenate([W.T @ q for W, q in zip(Ws, probs)])
    assert d @ m - np.max(np.asarray(P.A) @ d) > 0
    from jaxens.solvers.least_squares import least_squares

    ls = least_squares(P, jnp.asarray(m), jnp.ones(V, bool))
    np.testing.assert_allclose(np.asarray(sol.p[1]), np.asarray(ls.p), atol=1e-9)
