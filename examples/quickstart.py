"""jaxens in one page: combine members' next-token logits, solve the bottleneck, differentiate.

Runs on CPU in a few seconds with random members (no checkpoints needed)::

    python examples/quickstart.py

Three members share a vocabulary of ``v`` tokens; member ``i`` has an unembedding ``W_i`` of
width ``d_i`` and proposes ``softmax(W_i h_i)``.  The combiners:

* ``logit_average`` / ``prob_average``: the classic baselines;
* ``bottleneck(problem, objective)``: the distribution ``p`` chosen by ``objective`` among those
  that reproduce the members' moments ``W_iᵀp = W_iᵀp̂_i`` (hard), or pay
  ``rho_i/2 ||W_iᵀp - W_iᵀp̂_i||²`` for missing them (soft).

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
hidden = [rng.normal(size=(B, d)) * 3.0 for d in widths]
logits = [jnp.asarray(h @ W.T, jnp.float32) for h, W in zip(hidden, Ws)]

# 1. Classic combiners.
for name, comb in [("logit_average", jaxens.logit_average()), ("prob_average", jaxens.prob_average())]:
    logp, _, _ = comb.combine(logits, comb.init(B))
    print(f"{name:>14}: top token per row {np.asarray(logp.argmax(-1))}")

# 2. The bottleneck problem, built once per ensemble (Gram factorisations, orthonormal basis).
#    All members hard: the blog's problem (n·d = 72 < v, so it may or may not be feasible).
problem = jaxens.make_problem(Ws, hard="all")
for objective in ("kl", "sum_ce", "least_squares"):
    comb = jaxens.bottleneck(problem, objective)
    logp, state, sol = jax.jit(comb.combine)(logits, comb.init(B))
    statuses = [jaxens.Status(int(s)).name for s in np.asarray(sol.status)]
    print(f"{objective:>14}: statuses {statuses}  max residual {float(sol.primal_residual.max()):.1e}")

# 3. Only the strongest member's moments (always feasible: p̂_0 satisfies its own), KL objective.
strong = jaxens.make_problem(Ws, hard=(0,))
comb = jaxens.bottleneck(strong, "kl")
logp, _, sol = comb.combine(logits, comb.init(B))
print(f"{'kl, hard=(0,)':>14}: statuses {np.asarray(sol.status)}  sums {np.asarray(jnp.exp(logp).sum(-1))}")

# 4. Soft constraints with learnable strengths, and a gradient through the solver
#    (implicit differentiation of the optimality conditions).
soft = jaxens.make_problem(Ws, hard=None, soft=(0, 1, 2))
target = jnp.asarray(rng.integers(0, v, size=B))


def loss(member_logits, log_rho):
    comb = jaxens.bottleneck(soft, "kl", rho=jnp.exp(log_rho))
    logp, _, _ = comb.combine(member_logits, comb.init(B))
    return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=-1))


value, (g_logits, g_rho) = jax.value_and_grad(loss, argnums=(0, 1))(logits, jnp.zeros(3))
print(f"soft-kl NLL of random targets {float(value):.3f}; d/d log rho = {np.asarray(g_rho)}")
print(f"gradient w.r.t. member 0 logits: shape {g_logits[0].shape}, norm {float(jnp.linalg.norm(g_logits[0])):.3e}")
