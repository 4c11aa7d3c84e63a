"""jaxens in one page: combine members' next-token logits, solve the bottleneck, differentiate.

Runs on CPU with random members (no checkpoints needed), in about 30 s on a 2-core CPU (most of
it compiling the solvers)::

    python examples/quickstart.py

Three members share a vocabulary of ``v`` tokens; member ``i`` has an unembedding ``W_i`` of
width ``d_i`` and proposes ``softmax(W_i h_i)``.  The combiners:

* ``logit_average`` / ``prob_average``: the classic baselines;
* ``bottleneck(problem, objective)``: the distribution ``p`` chosen by ``objective`` among those
  that reproduce the members' moments ``W_iᵀp = W_iᵀp̂_i`` (hard), or pay
  ``rho_i/2 ||W_iᵀp - W_iᵀp̂_i||²`` for missing them (soft).

The members here are built so that the headline (all-hard) problem is feasible: every member's
distribution has the moments of one "true" distribution ``p*`` per row, plus its own noise outside
the span of its ``W_i`` (so the members differ).  Part 3 shows what happens when members
disagree: the all-hard problem is infeasible and the solver proves it.

Every combiner is ``Combiner(init, combine)``: ``combine(logits, state) -> (log p, state, info)``,
pure and jit/vmap-friendly.  The state carries warm starts between decoding steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxens

v, widths, B = 512, (16, 24, 32), 4
rng = np.random.default_rng(0)
Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for d in widths]


def member_logits(W, p_star, steps=40):
    """Logits ``W h + e`` (``e``: the member's noise) whose softmax has the moments ``Wᵀp*``:
    ``h`` minimises the convex ``logsumexp(W h + e) - hᵀWᵀp*`` (Newton steps)."""
    e, h = rng.normal(size=W.shape[0]), np.zeros(W.shape[1])
    for _ in range(steps):
        z = W @ h + e
        q = np.exp(z - z.max())
        q /= q.sum()
        H = W.T @ (q[:, None] * W) - np.outer(W.T @ q, W.T @ q)
        h -= np.linalg.solve(H + 1e-9 * np.eye(len(h)), W.T @ (q - p_star))
    return W @ h + e


p_star = rng.dirichlet(np.full(v, 0.1), size=B)            # one "true" distribution per row
logits = [jnp.asarray(np.stack([member_logits(W, p) for p in p_star]), jnp.float32) for W in Ws]
target = jnp.asarray([rng.choice(v, p=p) for p in p_star])  # tokens drawn from p*

# 1. Classic combiners.
for name, comb in [("logit_average", jaxens.logit_average()), ("prob_average", jaxens.prob_average())]:
    logp, _, _ = comb.combine(logits, comb.init(B))
    print(f"{name:>14}: top token per row {np.asarray(logp.argmax(-1))}")

# 2. The bottleneck problem, built once per ensemble (Gram factorisations, orthonormal basis).
#    All members hard: p must reproduce every member's moments (feasible here: p* does).
problem = jaxens.make_problem(Ws, hard="all")
for objective in ("kl", "sum_ce", "least_squares"):
    comb = jaxens.bottleneck(problem, objective)
    logp, state, sol = jax.jit(comb.combine)(logits, comb.init(B))
    statuses = [jaxens.Status(int(s)).name for s in np.asarray(sol.status)]
    print(f"{objective:>14}: statuses {statuses}  max residual {float(sol.primal_residual.max()):.1e}")

# 3. Members that disagree (unrelated logits): no p has all their moments; the solver proves it with
#    a Farkas certificate (margin > 0).  With only the strongest member hard the problem is always
#    feasible (p̂_0 satisfies its own moments).
unrelated = [jnp.asarray(3 * rng.normal(size=(B, v)), jnp.float32) for _ in Ws]
_, _, sol = jaxens.bottleneck(problem, "kl").combine(unrelated, None)
print(f"{'disagreeing':>14}: statuses {[jaxens.Status(int(s)).name for s in np.asarray(sol.status)]}  "
      f"certificate margins {np.round(np.asarray(sol.certificate_margin), 3)}")
strong = jaxens.make_problem(Ws, hard=(0,))
comb = jaxens.bottleneck(strong, "kl")
logp, _, sol = comb.combine(unrelated, comb.init(B))
print(f"{'kl, hard=(0,)':>14}: statuses {[jaxens.Status(int(s)).name for s in np.asarray(sol.status)]}  "
      f"sums {np.round(np.asarray(jnp.exp(logp).sum(-1)), 6)}")

# 4. Soft constraints with learnable strengths, and a gradient through the solver
#    (implicit differentiation of the optimality conditions).
soft = jaxens.make_problem(Ws, hard=None, soft=(0, 1, 2))


def loss(member_logits, log_rho):
    comb = jaxens.bottleneck(soft, "kl", rho=jnp.exp(log_rho))
    logp, _, _ = comb.combine(member_logits, comb.init(B))
    return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=-1))


value, (g_logits, g_rho) = jax.value_and_grad(loss, argnums=(0, 1))(logits, jnp.zeros(3))
print(f"soft-kl NLL of the targets {float(value):.3f}; d/d log rho = {np.asarray(g_rho)}")
print(f"gradient w.r.t. member 0 logits: shape {g_logits[0].shape}, norm {float(jnp.linalg.norm(g_logits[0])):.3e}")
