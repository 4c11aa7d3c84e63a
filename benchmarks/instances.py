r"""Non-degenerate bottleneck instances, and the measure that tells them from degenerate ones.

The bottleneck LP is

.. math::  \min_p\ c^\top p \quad\text{s.t.}\quad A^\top p = m,\ \mathbf 1^\top p = 1,\ p \ge 0 .

On the feasible set :math:`p - p'` lies in the null space of :math:`[A, \mathbf 1]^\top`, so the part
of :math:`c` in :math:`\operatorname{span}[A, \mathbf 1]` is constant there: only the residual
:math:`c_\perp = c - \Pi_{[A,1]} c` makes one feasible point better than another.  The
*degeneracy measure*

.. math::  \delta(c) = \lVert c_\perp\rVert / \lVert c - \bar c\,\mathbf 1\rVert \in [0, 1]

is 0 when every feasible ``p`` is optimal (a feasibility problem, not an LP) and near 1 when the
cost is unrelated to ``A``.  Here ``A`` holds the *constrained* members' columns.  Member logits of
the form :math:`\ell_i = W_i h_i` (every family here: no bias, no soft-capping) give
:math:`-\log\operatorname{softmax}(\ell_i) \in \operatorname{span}[W_i, 1]`, so the ``sum_ce``
cost with *every* member hard is degenerate for real models too (:math:`\delta` = rounding).  The
LP is a real LP only when the cost has a part off the constrained span: a member that is soft or
unconstrained (real rows with one member hard), or the explicit off-span noise of the Gaussian
family below.  (Strictly convex objectives, ``kl`` and ``sum_sq_ce``, have a unique optimum on
the set either way.)

**Gaussian family.**  :math:`W_i \sim \mathcal N(0, 1/d)^{v\times d}`; a target
:math:`p^\star = \operatorname{softmax}(g)`, :math:`g\sim\mathcal N(0, \sigma_g^2)`; member logits
:math:`\ell_i = W_i h_i + \varepsilon_i` with fixed noise :math:`\varepsilon_i \sim \mathcal
N(0, \sigma_\varepsilon^2)` and :math:`h_i` fitted (Newton on the convex
:math:`\operatorname{lse}(W_i h + \varepsilon_i) - h^\top W_i^\top p^\star`) so that
:math:`W_i^\top \operatorname{softmax}(\ell_i) = W_i^\top p^\star`.  Every member then has the
moments of :math:`p^\star`: the problem is feasible (:math:`p^\star` is a witness) and the noise
puts the cost off the span (:math:`\delta \approx 1`).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    mx = x.max(-1, keepdims=True)
    z = x - mx
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def span_basis(A: np.ndarray) -> np.ndarray:
    """An orthonormal basis of :math:`\\operatorname{span}[A, \\mathbf 1]` (``v x r``)."""
    M = np.concatenate([A, np.ones((A.shape[0], 1), A.dtype)], axis=1).astype(np.float64)
    U, s, _ = np.linalg.svd(M, full_matrices=False)
    rank = int(np.sum(s > s[0] * max(M.shape) * np.finfo(np.float64).eps))
    return U[:, :rank]


def degeneracy(basis: np.ndarray, c: np.ndarray) -> np.ndarray:
    """:math:`\\delta(c)` per row of ``c`` (``(..., v)``) for the basis of :func:`span_basis`."""
    c = np.asarray(c, np.float64)
    perp = c - (c @ basis) @ basis.T
    centred = c - c.mean(-1, keepdims=True)
    return np.linalg.norm(perp, axis=-1) / np.maximum(np.linalg.norm(centred, axis=-1), 1e-300)


class DegenerateInstance(ValueError):
    pass


def refuse_degenerate(delta: np.ndarray, name: str, min_delta: float = 1e-3) -> None:
    """Raise when a row's cost lies (numerically) in span[A, 1]: its objective is constant on the
    feasible set and an LP benchmark on it measures a feasibility problem."""
    bad = np.flatnonzero(np.asarray(delta) < min_delta)
    if bad.size:
        raise DegenerateInstance(
            f"{name}: {bad.size} of {np.size(delta)} rows have a cost in span[A, 1] "
            f"(degeneracy {np.min(delta):.1e} < {min_delta:g}): every feasible p is optimal there"
        )


def fit_moments(W: np.ndarray, eps: np.ndarray, target: np.ndarray, tol: float = 1e-12, max_iter: int = 100):
    """``h`` with ``W^T softmax(W h + eps) = target`` (Newton with backtracking on the convex dual)."""
    d = W.shape[1]
    h = np.zeros(d)

    def f(h):
        z = W @ h + eps
        mx = z.max()
        return mx + np.log(np.exp(z - mx).sum()) - h @ target

    for _ in range(max_iter):
        z = W @ h + eps
        q = np.exp(z - z.max())
        q /= q.sum()
        g = W.T @ q - target
        if np.max(np.abs(g)) <= tol:
            break
        Wq = W * q[:, None]
        H = W.T @ Wq - np.outer(W.T @ q, W.T @ q)
        step = np.linalg.solve(H + 1e-14 * np.eye(d), g)
        t, f0 = 1.0, f(h)
        while f(h - t * step) > f0 - 0.25 * t * (g @ step) and t > 1e-10:
            t *= 0.5
        h = h - t * step
    return h


@dataclasses.dataclass
class Instances:
    """Rows of one family: shared ``Ws`` (list of ``v x d_i``), per-row member logits
    ``(B, n, v)``, the witness ``p_star`` ``(B, v)`` and the LP cost ``c`` ``(B, v)``
    (``-mean_i log softmax(l_i)``), with the degeneracy of each row's cost."""

    name: str
    Ws: list
    logits: np.ndarray
    p_star: np.ndarray | None
    c: np.ndarray
    delta: np.ndarray

    @property
    def A(self) -> np.ndarray:
        return np.concatenate(self.Ws, axis=1)

    def moments(self) -> np.ndarray:
        """``m`` ``(B, D)``: each member's moments of its own distribution."""
        lp = log_softmax(self.logits)
        return np.stack([np.concatenate([W.T @ np.exp(lp[b, i]) for i, W in enumerate(self.Ws)]) for b in range(len(lp))])


def gaussian(v: int, n: int, d: int, batch: int, seed: int = 0, sigma_g: float = 2.0, sigma_eps: float = 1.0) -> Instances:
    """The Gaussian family of the module doc (feasible, non-degenerate)."""
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(n)]
    logits = np.empty((batch, n, v))
    p_star = np.empty((batch, v))
    for b in range(batch):
        ps = np.exp(log_softmax(sigma_g * rng.normal(size=v)))
        p_star[b] = ps
        for i, W in enumerate(Ws):
            eps = sigma_eps * rng.normal(size=v)
            logits[b, i] = W @ fit_moments(W, eps, W.T @ ps) + eps
    c = -log_softmax(logits).mean(1)
    delta = degeneracy(span_basis(np.concatenate(Ws, axis=1)), c)
    return Instances(f"gaussian v={v} n={n} d={d}", Ws, logits, p_star, c, delta)


def real_rows(batch: int, seed: int = 0, members=("smollm2-135m", "smollm2-tiny-64"), hard=(0,),
              window: int = 128, text: str | None = None) -> Instances:
    """Real rows: the members' next-token logits at ``batch`` positions of the shared texts' test
    splits (windows of ``window`` tokens, positions drawn with ``seed``), with their real
    unembeddings (``Ws``).  The degeneracy is measured against the ``hard`` members' span: with
    SmolLM2 hard and the trained member unconstrained, the cost's part from the trained member
    lies off SmolLM2's span.  ``p_star`` is ``None`` (the hard members' own moments are feasible:
    the hard member's distribution is a witness)."""
    from jaxens.harness import data, zoo
    from jaxens.models.forward import full_logits

    loaded = [zoo.load(name) for name in members]
    tok = loaded[0][1]
    texts = data.read_all()
    names = sorted(texts) if text is None else [text]
    rng = np.random.default_rng(seed)
    ids = np.concatenate([data.encode(tok, data.split_part(texts[nm], "test")) for nm in names])
    starts = rng.integers(0, len(ids) - window - 1, size=-(-batch // 8))
    rows = []
    for s in starts:
        toks = ids[s : s + window][None, :]
        per = [np.asarray(full_logits(model, toks)[0], np.float64) for model, _ in loaded]
        pos = rng.choice(np.arange(window // 4, window), size=8, replace=False)
        rows += [np.stack([lg[t] for lg in per]) for t in pos]
    logits = np.stack(rows[:batch])
    v = min(lg.shape[-1] for lg in logits[0])
    logits = logits[..., :v]
    Ws = [np.asarray(model.unembedding()[0], np.float64)[:v] for model, _ in loaded]
    c = -log_softmax(logits).mean(1)
    A_h = np.concatenate([Ws[i] for i in hard], axis=1)
    delta = degeneracy(span_basis(A_h), c)
    return Instances(f"real {'+'.join(members)} hard={list(hard)} v={v}", Ws, logits, None, c, delta)
