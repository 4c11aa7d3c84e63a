"""Implicit differentiation of the Newton solvers: finite differences and unrolled Newton."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxens.objectives import over_members
from jaxens.problem import make_problem
from jaxens.solvers.adjoint import UnrolledAdjoint
from jaxens.solvers.entropic_newton import EntropicNewton
from jaxens.solvers.instances import EntropicProgram, LinearProgram, MixtureCrossEntropy
from jaxens.solvers.cross_entropy_newton import CrossEntropyNewton
from jaxens.solvers.solution import Status


def kl_prior(log_probs, weights):
    """theta = sum_i w_i log p_i / sum_i w_i (members with w_i = 0 ignored)."""
    w = weights / jnp.sum(weights)
    return over_members(jnp.add, jnp.where(w[:, None] > 0, w[:, None] * log_probs, 0.0))


pytestmark = pytest.mark.x64


V, N, DIM = 40, 3, 3
TIGHT = EntropicNewton(tol=1e-13)
UNROLLED = EntropicNewton(tol=1e-13, adjoint=UnrolledAdjoint(steps=40))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def instance(seed=0, hard="all", soft=None):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(V, DIM)) for _ in range(N)]
    logp = np.stack([np.log(_softmax(1.5 * rng.normal(size=V))) for _ in range(N)])
    pstar = rng.dirichlet(5 * np.ones(V))  # interior point: small perturbations of m stay feasible
    problem = make_problem(Ws, hard=hard, soft=soft, dtype=jnp.float64)
    m = problem.moments(jnp.asarray(np.stack([pstar] * N) if soft is None else np.exp(logp)))
    a = jnp.asarray(rng.normal(size=V))  # loss weights
    return problem, jnp.asarray(logp), m, a


def _grad_check(f, args):
    check_grads(f, args, order=1, modes=["rev"], eps=1e-5, atol=1e-6, rtol=1e-5)


def test_kl_grads_wrt_theta_m_weights():
    problem, logp, m, a = instance(1)
    mask = jnp.ones(V, bool)
    theta = kl_prior(logp, jnp.array([0.5, 0.3, 0.2]))

    def loss(theta, m):
        sol, _ = TIGHT.solve(problem, EntropicProgram(theta, mask, m))
        return a @ sol.p + jnp.sum(sol.p ** 2)

    sol, _ = TIGHT.solve(problem, EntropicProgram(theta, mask, m))
    assert int(sol.status) == Status.SOLVED
    _grad_check(loss, (theta, m))

    # through the member log-probs and the ensemble weights (theta = sum_i w_i log p_i)
    def loss_w(w, logp):
        return loss(kl_prior(logp, w), m)

    _grad_check(loss_w, (jnp.array([0.5, 0.3, 0.2]), logp))


def test_soft_grads_wrt_rho_and_A():
    problem, logp, m, a = instance(2, hard=(0,), soft=(1, 2))
    mask = jnp.ones(V, bool)
    theta = jnp.mean(logp, 0)
    rho = jnp.array([1.0, 3.0, 10.0])

    def loss(rho, A):
        prob = dataclasses.replace(problem, A=A)
        return a @ TIGHT.solve(prob, EntropicProgram(theta, mask, m, rho))[0].p

    assert int(TIGHT.solve(problem, EntropicProgram(theta, mask, m, rho))[0].status) == Status.SOLVED
    _grad_check(loss, (rho, problem.A))


def test_implicit_matches_unrolled():
    problem, logp, m, a = instance(3, hard=(0, 1), soft=(2,))
    mask = jnp.ones(V, bool).at[:3].set(False)
    theta = jnp.mean(logp, 0).at[5].set(-jnp.inf)
    rho = jnp.array([1.0, 1.0, 4.0])
    # moments of a distribution that respects the mask (feasible hard part)
    pstar = np.random.default_rng(3).dirichlet(5 * np.ones(V))
    pstar[:3] = 0
    pstar[5] = 0
    pstar /= pstar.sum()
    m = problem.moments(jnp.asarray(np.stack([pstar] * N)))

    def loss(solver):
        def f(theta, m, rho, prob):
            sol, _ = solver.solve(prob, EntropicProgram(theta, mask, m, rho))
            return a @ sol.p + jnp.sum(sol.p ** 2)
        return f

    s_imp, _ = TIGHT.solve(problem, EntropicProgram(theta, mask, m, rho))
    s_unr, _ = UNROLLED.solve(problem, EntropicProgram(theta, mask, m, rho))
    assert int(s_imp.status) == Status.SOLVED and int(s_unr.status) == Status.SOLVED
    np.testing.assert_allclose(s_imp.p, s_unr.p, atol=1e-12)
    g_imp = jax.grad(loss(TIGHT), argnums=(0, 1, 2, 3))(theta, m, rho, problem)
    g_unr = jax.grad(loss(UNROLLED), argnums=(0, 1, 2, 3))(theta, m, rho, problem)
    # theta, m, rho and A (the soft member's columns).  Q and T_pinv are left out: a generic
    # perturbation of them takes 1 out of span(Q) and changes the feasible set discontinuously
    # (see jaxens.solvers.implicit), so no derivative exists to agree on.
    pairs = list(zip(g_imp[:3], g_unr[:3])) + [(g_imp[3].A, g_unr[3].A)]
    for gi, gu in pairs:
        assert np.all(np.isfinite(gi)) and np.abs(np.asarray(gi)).max() > 0
        np.testing.assert_allclose(gi, gu, rtol=1e-5, atol=1e-9)
    assert np.all(np.asarray(g_imp[0])[[0, 1, 2, 5]] == 0)  # masked tokens get no gradient


def test_lp_final_stage_grads():
    problem, logp, m, a = instance(4)
    mask = jnp.ones(V, bool)
    solver = EntropicNewton(tol=1e-13, eps_min=3e-2, eps_decay=0.3)
    c = -jnp.mean(logp, 0)

    def loss(c, m):
        return a @ solver.solve(problem, LinearProgram(c, mask, m))[0].p

    assert int(solver.solve(problem, LinearProgram(c, mask, m))[0].status) == Status.SOLVED
    _grad_check(loss, (c, m))


def test_reverse_ce_grads():
    problem, logp, m, a = instance(5, hard=(0,), soft=(1, 2))
    mask = jnp.ones(V, bool)
    s = jnp.mean(jnp.exp(logp), 0)
    rho = jnp.array([1.0, 2.0, 5.0])
    solver = CrossEntropyNewton(tol=1e-13)

    def loss(s, m, rho):
        return a @ solver.solve(problem, MixtureCrossEntropy(s, mask, m, rho))[0].p

    assert int(solver.solve(problem, MixtureCrossEntropy(s, mask, m, rho))[0].status) == Status.SOLVED
    _grad_check(loss, (s, m, rho))


def test_grad_of_vmapped_batch():
    problem, logp, m, a = instance(6)
    thetas = jnp.stack([jnp.mean(logp, 0), logp[0], logp[1]])
    masks = jnp.ones((3, V), bool)

    def loss(thetas):
        sol, _ = jax.vmap(lambda P, *a: TIGHT.solve(P, EntropicProgram(*a)), in_axes=(None, 0, 0, None))(problem, thetas, masks, m)
        return jnp.sum(sol.p @ a)

    g = jax.jit(jax.grad(loss))(thetas)
    for b in range(3):
        gb = jax.grad(lambda t: a @ TIGHT.solve(problem, EntropicProgram(t, masks[b], m))[0].p)(thetas[b])
        np.testing.assert_allclose(g[b], gb, rtol=1e-8, atol=1e-12)
