"""EntropicNewton (kl / max_entropy / LP by continuation) against cvxpy (Clarabel) and HiGHS."""


import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from jaxens.objectives import over_members
from jaxens.problem import make_problem
from jaxens.solvers.entropic_newton import EntropicNewton
from jaxens.solvers.instances import EntropicProgram, LinearProgram
from jaxens.solvers.solution import Status


def kl_prior(log_probs, weights):
    """theta = sum_i w_i log p_i / sum_i w_i (members with w_i = 0 ignored)."""
    w = weights / jnp.sum(weights)
    return over_members(jnp.add, jnp.where(w[:, None] > 0, w[:, None] * log_probs, 0.0))


pytestmark = pytest.mark.x64


# ------------------------------------------------------------------ instances
def _softmax(x):
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def _bottlenecked_fit(W, pstar):
    """argmin_h CE(p*, softmax(W h)): its moments W^T p_hat equal W^T p* (exactly, to 1e-12)."""

    def f(h):
        q = _softmax(W @ h)
        return -pstar @ np.log(q), W.T @ (q - pstar), W.T @ (W * q[:, None]) - np.outer(W.T @ q, W.T @ q)

    res = minimize(lambda h: f(h)[0], np.zeros(W.shape[1]), jac=lambda h: f(h)[1],
                   hess=lambda h: f(h)[2], method="trust-exact", options=dict(gtol=1e-13))
    return _softmax(W @ res.x)


def instance(kind="common", v=60, n=3, d=4, seed=0, hard="all", soft=None, dup=False):
    """Ws, member distributions p_hat (n, v), and the problem.

    kind="common": moments of one common p* (members' p_hat are unrelated softmaxes; only m
    comes from p*).  kind="fits": p_hat_i are the bottlenecked fits of p* (different p_hat_i,
    feasible moments).  kind="random": moments of unrelated p_hat_i (for soft constraints).
    """
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(v, d)) for _ in range(n)]
    if dup:
        Ws[1] = Ws[0].copy()
    pstar = rng.dirichlet(np.ones(v))
    if kind == "fits":
        phat = np.stack([_bottlenecked_fit(W, pstar) for W in Ws])
        mp = phat
    else:
        phat = np.stack([_softmax(2.0 * rng.normal(size=v)) for _ in range(n)])
        mp = np.stack([pstar] * n) if kind == "common" else phat
    problem = make_problem(Ws, hard=hard, soft=soft, dtype=jnp.float64)
    m = np.asarray(problem.moments(jnp.asarray(mp)))
    return Ws, phat, m, problem


def _cols(Ws, members):
    return np.concatenate([Ws[i] for i in members], axis=1) if members else np.zeros((Ws[0].shape[0], 0))


def _split_m(Ws, m, members):
    offs = np.cumsum([0] + [W.shape[1] for W in Ws])
    return np.concatenate([m[offs[i]:offs[i + 1]] for i in members]) if members else np.zeros(0)


def soft_penalty(p, Ws, m, soft, rho):
    offs = np.cumsum([0] + [W.shape[1] for W in Ws])
    return sum(0.5 * rho[i] * np.sum((Ws[i].T @ p - m[offs[i]:offs[i + 1]]) ** 2) for i in soft)


def kl_objective(p, theta, mask, Ws, m, soft, rho):
    logq = np.where(mask, theta, -np.inf)
    logq = logq - np.log(np.sum(np.exp(logq[mask] - logq[mask].max()))) - logq[mask].max()
    pm = p[mask]
    kl = np.sum(np.where(pm > 0, pm * (np.log(np.maximum(pm, 1e-300)) - logq[mask]), 0.0))
    return kl + soft_penalty(p, Ws, m, soft, rho)


def cvx_entropic(theta, mask, Ws, m, hard, soft, rho):
    v = theta.shape[0]
    p = cp.Variable(v)
    logq = np.where(mask, theta, -np.inf)
    mx = logq[mask].max()
    q = np.exp(logq - mx)
    q = q / q.sum()
    obj = cp.sum(cp.kl_div(p[mask], q[mask]))
    offs = np.cumsum([0] + [W.shape[1] for W in Ws])
    for i in soft:
        obj = obj + 0.5 * rho[i] * cp.sum_squares(Ws[i].T @ p - m[offs[i]:offs[i + 1]])
    cons = [cp.sum(p) == 1, p >= 0]
    if hard:
        cons.append(_cols(Ws, hard).T @ p == _split_m(Ws, m, hard))
    if not mask.all():
        cons.append(p[~mask] == 0)
    cp.Problem(cp.Minimize(obj), cons).solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11,
                                              tol_feas=1e-11, max_iter=500)
    return np.maximum(p.value, 0.0)


def assert_close_objective(ours, ref, rtol=1e-4):
    assert abs(ours - ref) <= rtol * max(abs(ref), 1.0), (ours, ref)


def hard_res(p, Ws, m, hard):
    return np.max(np.abs(_cols(Ws, hard).T @ p - _split_m(Ws, m, hard))) if hard else 0.0


# ------------------------------------------------------------------ kl / max entropy
@pytest.mark.parametrize("kind", ["common", "fits"])
@pytest.mark.parametrize("objective", ["kl", "max_entropy"])
def test_entropic_matches_cvxpy(kind, objective):
    Ws, phat, m, problem = instance(kind, seed=1)
    v = phat.shape[1]
    w = np.array([0.5, 0.3, 0.2])
    theta = np.asarray(kl_prior(jnp.log(jnp.asarray(phat)), jnp.asarray(w))) if objective == "kl" else np.zeros(v)
    mask = np.ones(v, bool)
    sol, z = EntropicNewton().solve(problem, EntropicProgram(jnp.asarray(theta), jnp.asarray(mask), jnp.asarray(m)))
    p = np.asarray(sol.p)
    assert int(sol.status) == Status.SOLVED
    hard = list(range(3))
    assert float(sol.primal_residual) <= 1e-8 and hard_res(p, Ws, m, hard) <= 1e-8
    assert abs(p.sum() - 1) < 1e-12 and p.min() >= 0
    p_ref = cvx_entropic(theta, mask, Ws, m, hard, [], None)
    assert_close_objective(kl_objective(p, theta, mask, Ws, m, [], None),
                           kl_objective(p_ref, theta, mask, Ws, m, [], None))
    np.testing.assert_allclose(p, p_ref, atol=1e-6)
    # the entropic solution has the exponential-family form p = softmax(theta + A_H y)
    if objective == "max_entropy":
        A1 = np.concatenate([_cols(Ws, hard), np.ones((v, 1))], axis=1)
        y, *_ = np.linalg.lstsq(A1, np.log(p), rcond=None)
        np.testing.assert_allclose(A1 @ y, np.log(p), atol=1e-8)


def test_hessian_topk_and_warm_start():
    Ws, phat, m, problem = instance("fits", v=80, seed=2)
    theta = jnp.asarray(np.log(phat).mean(0))
    mask = jnp.ones(80, bool)
    full, z = EntropicNewton().solve(problem, EntropicProgram(theta, mask, jnp.asarray(m)))
    top, _ = EntropicNewton(hessian_topk=30, max_iters=300).solve(problem, EntropicProgram(theta, mask, jnp.asarray(m)))
    assert int(top.status) == Status.SOLVED
    np.testing.assert_allclose(top.p, full.p, atol=1e-9)
    warm, _ = EntropicNewton().solve(problem, EntropicProgram(theta, mask, jnp.asarray(m)), z)
    assert int(warm.iterations) <= 1 and int(warm.status) == Status.SOLVED
    np.testing.assert_allclose(warm.p, full.p, atol=1e-12)


def test_topk_hessian_with_tail_is_a_psd_underestimate():
    """The top-k Hessian with the tail's mean (``pG``) is PSD and below the exact one in the
    Loewner order (Cauchy-Schwarz; see ``_hessian``), and exact when the tail is one token."""
    from jaxens.solvers.dual import entropic_hessian
    from jaxens.solvers.entropic_dual import build_dual as _build

    def _hessian(d, p, topk, pG=None):
        return entropic_hessian(d.G, d.rinv, p, topk, pG=pG)

    Ws, phat, m, problem = instance("fits", v=200, n=2, d=6, seed=4)
    mask = jnp.ones(200, bool)
    d = _build(problem, jnp.asarray(np.log(phat).mean(0)), mask, jnp.asarray(m), jnp.ones(2))
    rng = np.random.default_rng(0)
    eig = lambda M: np.linalg.eigvalsh(0.5 * (M + M.T))  # noqa: E731
    for scale in (0.5, 3.0):  # flat (heavy tail) and peaked distributions
        p = jnp.asarray(_softmax(scale * rng.normal(size=200)))
        exact = np.asarray(_hessian(d, p, None))
        for k in (5, 20, 100):
            tail = np.asarray(_hessian(d, p, k, pG=p @ d.G))
            assert eig(tail).min() >= -1e-12
            assert eig(exact - tail).min() >= -1e-12
        np.testing.assert_allclose(np.asarray(_hessian(d, p, 199, pG=p @ d.G)), exact, atol=1e-13)


@pytest.mark.parametrize("hard,soft", [((0,), (1, 2)), ((), (0, 1, 2))])
def test_soft_constraints_match_cvxpy(hard, soft):
    Ws, phat, m, problem = instance("random", seed=3, hard=hard, soft=soft)
    v = phat.shape[1]
    rho = np.array([2.0, 5.0, 30.0])
    theta = np.log(phat).mean(0)
    mask = np.ones(v, bool)
    sol, _ = EntropicNewton().solve(problem, EntropicProgram(jnp.asarray(theta), jnp.asarray(mask), jnp.asarray(m), jnp.asarray(rho)))
    assert int(sol.status) == Status.SOLVED
    p = np.asarray(sol.p)
    assert hard_res(p, Ws, m, list(hard)) <= 1e-8
    p_ref = cvx_entropic(theta, mask, Ws, m, list(hard), list(soft), rho)
    assert_close_objective(kl_objective(p, theta, mask, Ws, m, soft, rho),
                           kl_objective(p_ref, theta, mask, Ws, m, soft, rho))
    np.testing.assert_allclose(p, p_ref, atol=1e-6)


def test_masked_tokens():
    Ws, phat, m, problem = instance("common", v=60, seed=4)
    rng = np.random.default_rng(4)
    theta = rng.normal(size=60)
    # the common p* must vanish on the disallowed tokens for feasibility: rebuild m from it
    mask = np.ones(60, bool)
    mask[:5] = False          # masked by the mask
    theta[5:10] = -np.inf     # masked by -inf logits
    pstar = rng.dirichlet(np.ones(60))
    pstar[:10] = 0
    pstar /= pstar.sum()
    m = np.asarray(problem.moments(jnp.asarray(np.stack([pstar] * 3))))
    sol, _ = EntropicNewton().solve(problem, EntropicProgram(jnp.asarray(theta), jnp.asarray(mask), jnp.asarray(m)))
    p = np.asarray(sol.p)
    assert int(sol.status) == Status.SOLVED
    assert np.all(p[:10] == 0.0) and np.all(np.isfinite(p))
    eff = mask & np.isfinite(theta)
    obj = kl_objective(p, theta, eff, Ws, m, [], None)
    assert np.isfinite(obj)
    p_ref = cvx_entropic(np.where(eff, theta, 0.0), eff, Ws, m, [0, 1, 2], [], None)
    assert_close_objective(obj, kl_objective(p_ref, theta, eff, Ws, m, [], None))
    # gradients through -inf logits stay finite (zero at the masked tokens)
    g = jax.grad(lambda t: jnp.sum(EntropicNewton().solve(problem, EntropicProgram(t, jnp.asarray(mask), jnp.asarray(m)))[0].p ** 2))(
        jnp.asarray(theta))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:10] == 0)


def test_nonfinite_input_gives_uniform_fallback():
    Ws, phat, m, problem = instance("common", seed=5)
    theta = np.log(phat).mean(0)
    theta[7] = np.nan
    mask = np.ones(60, bool)
    mask[:3] = False
    for inst in (EntropicProgram, LinearProgram):
        sol, z = EntropicNewton().solve(problem, inst(jnp.asarray(theta), jnp.asarray(mask), jnp.asarray(m)))
        assert int(sol.status) == Status.NONFINITE_INPUT
        p = np.asarray(sol.p)
        assert np.all(np.isfinite(p)) and np.all(np.isfinite(z))
        np.testing.assert_allclose(p, mask / mask.sum(), atol=1e-15)


def test_rank_deficient_duplicated_members():
    Ws, phat, m, problem = instance("common", seed=6, dup=True)
    assert problem.rank == 3 * 4 + 1 - 4
    theta = np.log(phat).mean(0)
    mask = np.ones(60, bool)
    sol, _ = EntropicNewton().solve(problem, EntropicProgram(jnp.asarray(theta), jnp.asarray(mask), jnp.asarray(m)))
    assert int(sol.status) == Status.SOLVED
    p = np.asarray(sol.p)
    assert float(sol.primal_residual) <= 1e-8
    p_ref = cvx_entropic(theta, mask, [Ws[0], Ws[2]], np.concatenate([m[:4], m[8:]]), [0, 1], [], None)
    np.testing.assert_allclose(p, p_ref, atol=1e-6)


def test_infeasible_terminates_with_valid_distribution():
    # n*d + 1 = 16 constraints on v = 18 tokens, moments from unrelated members: infeasible
    Ws, phat, m, problem = instance("random", v=18, n=3, d=5, seed=7)
    A = np.concatenate(Ws, axis=1)
    lp = linprog(np.zeros(18), A_eq=np.vstack([A.T, np.ones(18)]), b_eq=np.concatenate([m, [1.0]]), method="highs")
    assert lp.status == 2  # HiGHS agrees it is infeasible
    sol, z = EntropicNewton(max_iters=50).solve(problem, EntropicProgram(jnp.zeros(18), jnp.ones(18, bool), jnp.asarray(m)))
    assert int(sol.status) in (Status.MAX_ITERS, Status.NUMERICAL_ERROR)
    p = np.asarray(sol.p)
    assert np.all(np.isfinite(p)) and p.min() >= 0 and abs(p.sum() - 1) < 1e-9
    assert float(sol.primal_residual) > 1e-6 and np.all(np.isfinite(z))


# ------------------------------------------------------------------ LP
@pytest.mark.parametrize("kind", ["common", "fits"])
def test_lp_matches_highs(kind):
    Ws, phat, m, problem = instance(kind, v=60, seed=8)
    rng = np.random.default_rng(8)
    c = -np.log(phat).mean(0) + 0.1 * rng.normal(size=60)
    mask = np.ones(60, bool)
    mask[-3:] = False
    A = np.concatenate(Ws, axis=1)
    bounds = [(0, None) if mk else (0, 0) for mk in mask]
    ref = linprog(c, A_eq=np.vstack([A.T, np.ones(60)]), b_eq=np.concatenate([m, [1.0]]), bounds=bounds,
                  method="highs")
    assert ref.status == 0
    sol, y = EntropicNewton().solve(problem, LinearProgram(jnp.asarray(c), jnp.asarray(mask), jnp.asarray(m)))
    p = np.asarray(sol.p)
    assert int(sol.status) == Status.SOLVED
    assert float(sol.primal_residual) <= 1e-5 and hard_res(p, Ws, m, [0, 1, 2]) <= 1e-5
    assert np.all(p[~mask] == 0)
    assert_close_objective(c @ p, ref.fun)
    assert c @ p >= ref.fun - 1e-6
    assert 0 <= float(sol.gap) <= 1e-4 * max(1, abs(ref.fun))  # the reported duality gap is a true gap
    # y is a near-feasible LP dual: its bound is within the gap of the optimum
    assert float(sol.gap) >= c @ p - ref.fun - 1e-7


def test_lp_soft_matches_cvxpy():
    Ws, phat, m, problem = instance("random", seed=9, hard=(0,), soft=(1, 2))
    c = -np.log(phat).mean(0)
    rho = np.array([1.0, 3.0, 10.0])
    sol, _ = EntropicNewton().solve(problem, LinearProgram(jnp.asarray(c), jnp.ones(60, bool), jnp.asarray(m), jnp.asarray(rho)))
    p = np.asarray(sol.p)
    assert int(sol.status) == Status.SOLVED and hard_res(p, Ws, m, [0]) <= 1e-5
    x = cp.Variable(60)
    offs = np.cumsum([0, 4, 4, 4])
    obj = c @ x + sum(0.5 * rho[i] * cp.sum_squares(Ws[i].T @ x - m[offs[i]:offs[i + 1]]) for i in (1, 2))
    prob = cp.Problem(cp.Minimize(obj), [x >= 0, cp.sum(x) == 1, Ws[0].T @ x == m[:4]])
    prob.solve(solver=cp.CLARABEL)
    ours = c @ p + soft_penalty(p, Ws, m, (1, 2), rho)
    assert_close_objective(ours, prob.value)
    assert 0 <= float(sol.gap) <= 1e-4 * max(1, abs(prob.value))


# ------------------------------------------------------------------ batching, compiles, float32
def test_vmap_matches_rows_and_compiles_once():
    Ws, phat, m, problem = instance("fits", seed=10)
    rng = np.random.default_rng(10)
    B = 4
    thetas = jnp.asarray(np.log(phat).mean(0) + 0.3 * rng.normal(size=(B, 60)))
    masks = jnp.ones((B, 60), bool).at[1, :4].set(False)
    ms = jnp.asarray(np.stack([m] * B))
    solver = EntropicNewton()
    f = jax.jit(jax.vmap(lambda P, *a: solver.solve(P, EntropicProgram(*a)), in_axes=(None, 0, 0, 0)))
    sol, z = f(problem, thetas, masks, ms)
    for b in range(B):
        row, _ = solver.solve(problem, EntropicProgram(thetas[b], masks[b], ms[b]))
        if b == 1:
            continue  # masked row: moments of p* include the masked tokens -> checked separately
        np.testing.assert_allclose(sol.p[b], row.p, atol=1e-12)
        assert int(sol.status[b]) == int(row.status)
    sol2, _ = f(problem, thetas + 0.1, masks, ms)
    assert f._cache_size() == 1
    g = jax.jit(jax.vmap(lambda P, *a: solver.solve(P, LinearProgram(*a)), in_axes=(None, 0, 0, 0)))
    g(problem, -thetas, masks, ms)
    g(problem, -thetas * 1.1, masks, ms)
    assert g._cache_size() == 1


def test_float32_agrees_with_float64():
    Ws, phat, m, problem64 = instance("fits", seed=11)
    problem32 = make_problem(Ws, dtype=jnp.float32)
    theta = np.log(phat).mean(0)
    mask = jnp.ones(60, bool)
    s64, _ = EntropicNewton().solve(problem64, EntropicProgram(jnp.asarray(theta), mask, jnp.asarray(m)))
    s32, _ = EntropicNewton().solve(problem32, EntropicProgram(jnp.asarray(theta, jnp.float32), mask, jnp.asarray(m, jnp.float32)))
    assert s32.p.dtype == jnp.float32
    assert int(s32.status) == Status.SOLVED
    np.testing.assert_allclose(np.asarray(s32.p, np.float64), s64.p, atol=1e-5, rtol=1e-4)
    assert float(s32.primal_residual) <= 1e-4
    c = -theta
    l64, _ = EntropicNewton(eps_min=1e-3).solve(problem64, LinearProgram(jnp.asarray(c), mask, jnp.asarray(m)))
    l32, _ = EntropicNewton(eps_min=1e-3).solve(problem32, LinearProgram(jnp.asarray(c, jnp.float32), mask, jnp.asarray(m, jnp.float32)))
    assert int(l32.status) == Status.SOLVED
    # theta = -c/eps reaches |c|/(1e-3 range c): float32 resolves grad phi to ~1e-4 there
    np.testing.assert_allclose(np.asarray(l32.p, np.float64), l64.p, atol=1e-3)
    assert abs(float(c @ l32.p) - float(c @ l64.p)) <= 1e-3 * max(1.0, abs(float(c @ l64.p)))


@pytest.mark.no_typecheck
def test_bad_shapes_raise():
    Ws, phat, m, problem = instance("common", seed=12)
    with pytest.raises(ValueError, match="theta must have shape"):
        EntropicNewton().solve(problem, EntropicProgram(jnp.zeros((2, 60)), jnp.ones(60, bool), jnp.asarray(m)))
    with pytest.raises(ValueError, match="warm must have shape"):
        EntropicNewton().solve(problem, EntropicProgram(jnp.zeros(60), jnp.ones(60, bool), jnp.asarray(m)), jnp.zeros(3))
    with pytest.raises(ValueError, match="eps_decay"):
        EntropicNewton(eps_decay=2.0)
