r"""Learning combiner parameters by gradient descent through the combiners (and their solvers).

Given cached member logits :math:`\ell_{i,r}` at rows :math:`r = 1..P` of a validation split and
the observed next tokens :math:`y_r`, :func:`fit` minimises the held-out negative log-likelihood

.. math::  L(\theta) = \frac1P \sum_r \min\big(-\log p_\theta(y_r \mid \ell_{1,r},\dots,\ell_{n,r}),\ c\big)

with an optax optimiser, where :math:`p_\theta` is the combiner that ``combiner_factory(theta)``
builds (the cap :math:`c` keeps a zero-mass row from dominating; it has no gradient there).  The
parameters are unconstrained and mapped onto their domains inside the factories:

* member weights :math:`w = \mathrm{softmax}(a)` (on the simplex),
* temperatures :math:`T = \exp(t)`,
* soft-constraint strengths :math:`\rho_i = \mathrm{softplus}(r_i)`,
* smoothing :math:`\lambda = \sigma(s)` (towards the logit average).

Gradients of bottleneck combiners flow through the solvers' adjoints (the entropic Newton solver
of the ``kl`` objective differentiates :math:`p^\star` by the implicit function theorem on its
dual optimality condition).

:func:`sensitivity` gives :math:`\partial \log p^\star_y / \partial \ell_{i,k}` for one position:
how the combined probability of a token responds to each member's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int

from jaxens.combiners.averaging import logit_average, prob_average
from jaxens.combiners.base import Combiner
from jaxens.combiners.bottleneck import bottleneck

Params = Any  # a pytree of arrays


# ---------------------------------------------------------------- parametrisations


def _softplus_inv(x: float) -> float:
    return float(x + np.log(-np.expm1(-x)))


def _logit(x: float) -> float:
    return float(np.log(x) - np.log1p(-x))


def averaging_params(n: int, temperature: float = 1.0) -> dict:
    """Unconstrained start for the averaging combiners: uniform weights, temperature ``T``."""
    if n < 1:
        raise ValueError(f"need at least one member, got n={n}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return {"weights": jnp.zeros((n,), jnp.float32), "log_temperature": jnp.asarray(np.log(temperature), jnp.float32)}


def prob_average_factory(params: dict) -> Combiner:
    """``prob_average(softmax(weights), temperature=exp(log_temperature))``."""
    return prob_average(jax.nn.softmax(params["weights"]), jnp.exp(params["log_temperature"]))


def logit_average_factory(params: dict) -> Combiner:
    """``logit_average(softmax(weights), temperature=exp(log_temperature))``."""
    return logit_average(jax.nn.softmax(params["weights"]), jnp.exp(params["log_temperature"]))


def bottleneck_params(n: int, rho: float = 1.0, lam: float = 0.1) -> dict:
    """Unconstrained start for :func:`bottleneck_kl_factory`: uniform weights, ``rho_i = rho``, ``lambda``."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1) (it is learned through a sigmoid), got {lam}")
    return {
        "weights": jnp.zeros((n,), jnp.float32),
        "rho": jnp.full((n,), _softplus_inv(rho), jnp.float32),
        "lam": jnp.asarray(_logit(lam), jnp.float32),
    }


def bottleneck_kl_factory(params: dict, problem, solver: Any = None) -> Combiner:
    """The ``kl`` bottleneck combiner with soft constraints, weights, ``rho_i`` and ``lambda`` from ``params``.

    ``problem`` must have soft members (``make_problem(..., hard=(), soft=range(n))``); pass it to
    :func:`fit` as ``context`` so that it is an argument of the compiled step, not a constant.
    """

    if not problem.soft:
        raise ValueError("bottleneck_kl_factory needs a problem with soft members (make_problem(..., soft=...))")
    return bottleneck(
        problem,
        "kl",
        weights=jax.nn.softmax(params["weights"]),
        rho=jax.nn.softplus(params["rho"]),
        lam=jax.nn.sigmoid(params["lam"]),
        solver=solver,
        warm_start=False,
    )


def readable(params: dict) -> dict:
    """The constrained values of a parameter dict (weights, temperature, rho, lam) as Python numbers."""
    out = {}
    if "weights" in params:
        out["weights"] = [float(x) for x in np.asarray(jax.nn.softmax(params["weights"]))]
    if "log_temperature" in params:
        out["temperature"] = float(np.exp(params["log_temperature"]))
    if "rho" in params:
        out["rho"] = [float(x) for x in np.asarray(jax.nn.softplus(params["rho"]))]
    if "lam" in params:
        out["lam"] = float(jax.nn.sigmoid(params["lam"]))
    return out


# ---------------------------------------------------------------- fitting


def _build(factory, params, context):
    return factory(params) if context is None else factory(params, context)


def combined_log_probs(
    factory: Callable[..., Combiner], params: Params, member_logits: Sequence[Array], context: Any = None
) -> Float[Array, "B v"]:
    """``log p`` of the combiner ``factory(params)`` for member logits ``[(B, v)] * n``."""
    comb = _build(factory, params, context)
    logp, _, _ = comb.combine(list(member_logits), comb.init(member_logits[0].shape[0]))
    return logp


def _check_inputs(member_logits, targets):
    if isinstance(member_logits, (np.ndarray, jax.Array)):
        member_logits = list(member_logits)
    if not member_logits:
        raise ValueError("fit needs the logits of at least one member")
    xs = [jnp.asarray(x, jnp.float32) for x in member_logits]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"member_logits must be n arrays of one shape (P, v), got shapes {[x.shape for x in xs]}")
    P, v = xs[0].shape
    t = np.asarray(targets)
    if t.shape != (P,):
        raise ValueError(f"targets must have shape (P,) = ({P},), got {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= v):
        raise ValueError(f"targets must be token ids in [0, {v}), got range [{t.min()}, {t.max()}]")
    return xs, jnp.asarray(t, jnp.int32)


def fit(
    member_logits: Sequence[Float[ArrayLike, "P v"]],
    targets: Int[ArrayLike, " P"],
    combiner_factory: Callable[..., Combiner],
    params0: Params,
    steps: int = 100,
    optimizer: optax.GradientTransformation | None = None,
    *,
    context: Any = None,
    batch_rows: int | None = None,
    nll_cap: float = 50.0,
) -> tuple[Params, dict]:
    """Minimise the mean NLL of ``targets`` under ``combiner_factory(params)`` (full batch).

    Args:
      member_logits: ``n`` arrays ``(P, v)``: each member's logits at the ``P`` rows.
      targets: ``(P,)`` observed next tokens.
      combiner_factory: ``factory(params) -> Combiner`` (or ``factory(params, context)``).
      params0: initial (unconstrained) parameter pytree.
      steps: optimiser steps.
      optimizer: an optax transformation (default ``optax.adam(0.05)``).
      context: optional pytree passed to the factory as a traced argument (e.g. the
        :class:`BottleneckProblem`, so its ``v x D`` arrays are not baked into the compile).
      batch_rows: rows per compiled chunk (gradients are accumulated over chunks; the last one is
        padded with zero-weight rows); default all rows at once.
      nll_cap: per-row NLL cap (rows with zero mass on the target give ``nll_cap`` and no gradient).

    Returns:
      ``(params, history)`` with ``history["loss"]`` the mean NLL before each step and after the
      last one (length ``steps + 1``) and ``history["best_step"]`` the index of its minimum;
      the returned ``params`` are those of the lowest loss seen.
    """
    xs, tg = _check_inputs(member_logits, targets)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    optimizer = optimizer or optax.adam(0.05)
    P = tg.shape[0]
    B = P if batch_rows is None else max(1, min(int(batch_rows), P))
    nb = -(-P // B)
    pad = nb * B - P
    wt = jnp.concatenate([jnp.ones((P,)), jnp.zeros((pad,))])
    if pad:
        xs = [jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) for x in xs]
        tg = jnp.concatenate([tg, jnp.repeat(tg[-1:], pad)])

    def chunk_loss(params, x, t, w, ctx):
        logp = combined_log_probs(combiner_factory, params, x, ctx)
        lt = jnp.take_along_axis(logp, t[:, None], axis=-1)[:, 0]
        nll = jnp.minimum(-lt, nll_cap)
        return jnp.sum(w * nll)

    vg = jax.jit(jax.value_and_grad(chunk_loss))

    @jax.jit
    def update(params, opt_state, grads):
        upd, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state

    def loss_and_grad(params):
        total, grads = 0.0, None
        for b in range(nb):
            sl = slice(b * B, (b + 1) * B)
            val, g = vg(params, [x[sl] for x in xs], tg[sl], wt[sl], context)
            total += float(val)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        return total / P, jax.tree.map(lambda g: g / P, grads)

    params = params0
    opt_state = optimizer.init(params)
    losses = []
    best, best_loss = params, np.inf
    for _ in range(steps):
        loss, grads = loss_and_grad(params)
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = params, loss
        params, opt_state = update(params, opt_state, grads)
    final, _ = loss_and_grad(params)
    losses.append(final)
    if final < best_loss or not np.isfinite(best_loss):
        best, best_loss = params, final
    return best, {"loss": np.asarray(losses), "best_step": int(np.argmin(losses))}


# ---------------------------------------------------------------- sensitivity


def sensitivity(
    member_logits: Sequence[Float[ArrayLike, " v"]] | Float[ArrayLike, "n v"],
    token: int,
    combiner: Combiner,
) -> tuple[float, Float[Array, "n v"]]:
    r"""``(log p*[token], d log p*[token] / d member logits)`` at one position.

    ``member_logits`` holds one ``(v,)`` logit vector per member; the gradient has shape
    ``(n, v)``.  For probability averaging row ``i`` is
    :math:`w_i \hat p_{i,y}(e_y - \hat p_i) / p_y`; for the bottleneck combiners it flows through
    the solver's adjoint.
    """
    x = jnp.stack([jnp.asarray(l, jnp.float32) for l in member_logits])
    if x.ndim != 2:
        raise ValueError(f"member_logits must be n vectors of shape (v,), got {x.shape}")
    n, v = x.shape
    if not 0 <= int(token) < v:
        raise ValueError(f"token must be in [0, {v}), got {token}")

    def f(x):
        logp, _, _ = combiner.combine([x[i][None] for i in range(n)], combiner.init(1))
        return logp[0, int(token)]

    val, g = jax.value_and_grad(f)(x)
    return float(val), g


def sensitivity_report(
    grad: Float[Array, "n v"],
    names: Sequence[str] | None = None,
    top: int = 5,
    decode: Callable[[int], str] | None = None,
) -> str:
    """A small text view: per member, the gradient norm and the tokens with the largest ``|grad|``."""
    g = np.asarray(grad, np.float64)
    n = g.shape[0]
    names = list(names) if names is not None else [f"member {i}" for i in range(n)]
    lines = []
    for i in range(n):
        order = np.argsort(-np.abs(g[i]))[:top]
        toks = ", ".join(f"{(decode(int(k)) if decode else int(k))!r}:{g[i, k]:+.3g}" for k in order)
        lines.append(f"{names[i]:>20s}  |grad|_1={np.abs(g[i]).sum():.3g}  top: {toks}")
    return "\n".join(lines)
