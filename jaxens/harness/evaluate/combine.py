"""Running a combiner over the cached rows: padded batches, one compile, timings; and the
least-squares phase of the hard constraints computed once per row.

:func:`run_combiner` maps cached member logits ``(n, P, v)`` to ``log p`` ``(P, v)`` in batches of
``batch_rows`` rows (the last batch padded, so each combiner compiles once), with cold starts
(rows are independent positions); ``seconds_per_row`` excludes the compile.
:func:`feasibility_rows` returns, per row, the status and distribution of
:func:`jaxens.solvers.least_squares.least_squares` on the hard moments of the uniform logit
average; :func:`run_feasible_rows` runs a combiner only on the rows that phase did not prove
infeasible.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxens.objectives as obj
from jaxens.combiners.base import Combiner
from jaxens.harness.reports import progress_bar
from jaxens.solvers.least_squares import least_squares


class CombinerRun(NamedTuple):
    logp: np.ndarray  # (P, v) float32
    status: np.ndarray | None  # (P,) solver status (bottleneck combiners)
    iterations: np.ndarray | None  # (P,)
    seconds_per_row: float  # combine time per row, compile excluded
    compile_seconds: float


class JitCombiner:
    """``jit(combine)`` returning ``(log_probs, info)``, compiled ahead of time once per input shape
    (:meth:`compiled`), so that no batch runs twice to keep the compile out of a timing."""

    def __init__(self, combiner: Combiner):
        self.fn = jax.jit(lambda xs, st: combiner.combine(list(xs), st)[::2])
        self._compiled: dict = {}
        self.compile_seconds = 0.0  # of the last new compile

    def compiled(self, xs, state):
        key = tuple((x.shape, x.dtype) for x in xs)
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = self.fn.lower(xs, state).compile()
            self.compile_seconds = time.perf_counter() - t0
        return self._compiled[key]

    def __call__(self, xs, state):
        return self.compiled(xs, state)(xs, state)


def jit_combiner(combiner: Combiner) -> JitCombiner:
    """``jit(combine)`` returning ``(log_probs, info)``; reuse it across calls of :func:`run_combiner`."""
    return JitCombiner(combiner)


def run_combiner(combiner: Combiner, logits: np.ndarray, batch_rows: int = 16, progress: bool = False,
                 desc: str = "", fn: JitCombiner | None = None) -> CombinerRun:
    """``combiner.combine`` over the cached rows ``logits`` ``(n, P, v)`` in padded batches of
    ``batch_rows`` (cold starts: rows are independent positions), a tqdm bar over the batches
    when ``progress``.  ``fn``: from :func:`jit_combiner`.  The compile runs ahead of time (its
    seconds are ``compile_seconds``, 0 when ``fn`` had compiled this shape before); every batch is
    solved once and timed."""
    n, P, v = logits.shape
    B = batch_rows
    nb = -(-P // B)
    pad = nb * B - P
    x = np.concatenate([logits, np.repeat(logits[:, -1:], pad, axis=1)], axis=1) if pad else logits
    fn = fn or jit_combiner(combiner)

    def inputs(b):
        return tuple(jnp.asarray(x[i, b * B : (b + 1) * B]) for i in range(n)), combiner.init(B)

    before = dict(fn._compiled)
    exe = fn.compiled(*inputs(0))
    compile_s = fn.compile_seconds if len(fn._compiled) > len(before) else 0.0
    outs = []
    bar = progress_bar(total=nb, desc=desc or "combine", disable=not progress, leave=False)
    spent = 0.0
    for b in range(nb):
        xs, st = inputs(b)
        t0 = time.perf_counter()
        outs.append(jax.block_until_ready(exe(xs, st)))
        spent += time.perf_counter() - t0
        bar.update(1)
    bar.close()
    per_row = spent / (nb * B)
    logp = np.concatenate([np.asarray(o[0], np.float32) for o in outs])[:P]
    info = [o[1] for o in outs]
    status = iters = None
    if hasattr(info[0], "status"):
        status = np.concatenate([np.asarray(i.status) for i in info])[:P]
        if hasattr(info[0], "iterations"):  # a solver's Solution (the averaging combiners report status only)
            iters = np.concatenate([np.asarray(i.iterations) for i in info])[:P]
    return CombinerRun(logp, status, iters, per_row, compile_s)


def run_feasible_rows(comb, logits, batch_rows, fn, status, p_ls, ls_seconds_per_row, progress: bool = False,
                      desc: str = "") -> CombinerRun:
    """:func:`run_combiner` on the rows the least-squares phase did not prove infeasible; the
    infeasible rows get the least-squares distribution with status ``INFEASIBLE`` (what the
    combiner itself returns for them).  ``comb`` runs without its own least-squares phase
    (``check_feasibility=False``): the verdict is ``status``."""
    P = logits.shape[1]
    infeasible = status == 2
    with np.errstate(divide="ignore"):
        logp = np.log(np.maximum(p_ls, 0.0)).astype(np.float32)
    out_status = np.full((P,), 2, np.int32)
    iters = np.zeros((P,), np.float64)
    keep = np.nonzero(~infeasible)[0]
    per_row, compile_s = 0.0, 0.0
    if keep.size:
        run = run_combiner(comb, logits[:, keep], batch_rows, fn=fn, progress=progress, desc=desc)
        logp[keep] = run.logp
        out_status[keep] = run.status
        iters[keep] = run.iterations
        per_row, compile_s = run.seconds_per_row * keep.size / P, run.compile_seconds
    return CombinerRun(logp, out_status, iters, per_row + ls_seconds_per_row, compile_s)


def feasibility_rows(problem, logits: np.ndarray, batch_rows: int, solver=None,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares phase of the hard constraints for every cached row (``(n, P, v)`` logits).

    Returns ``(status (P,), p_ls (P, v))``: what :func:`jaxens.combiners.bottleneck.solve_row`
    returns for an ``INFEASIBLE`` row whatever the objective, computed once per row instead of
    once per objective (and without first running the objective's solver to its cap on a row
    that has no feasible point).
    """
    n, P, v = logits.shape
    w = jnp.ones((n,), problem.A.dtype) / n

    @jax.jit
    def run(x):
        def one(xr):
            d = obj.row_data("kl", xr, w)
            m = problem.moments(jnp.exp(d.logp))
            return least_squares(problem, m, d.mask, solver)
        sol = jax.vmap(one)(x)
        return sol.status, sol.p

    status, ps = [], []
    bar = progress_bar(total=-(-P // batch_rows), desc="least-squares phase", disable=not progress, leave=False)
    for b in range(0, P, batch_rows):
        x = jnp.asarray(np.moveaxis(logits[:, b : b + batch_rows], 0, 1), problem.A.dtype)
        st, p = run(x)
        status.append(np.asarray(st))
        ps.append(np.asarray(p, np.float32))
        bar.update(1)
    bar.close()
    return np.concatenate(status), np.concatenate(ps)
