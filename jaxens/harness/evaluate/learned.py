"""Rows whose combiner parameters are learned on the validation split (:func:`jaxens.learn.fit`):
the logit and probability averages with weights and temperature (and ME, whose per-step
distribution is the learned probability average's), and optionally ``kl`` with soft constraints."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

import jaxens.learn as learn
from jaxens.harness.evaluate.combine import run_combiner
from jaxens.harness.evaluate.config import EvalConfig
from jaxens.harness.evaluate.metrics import row_scores, summarize
from jaxens.harness.evaluate.rows import make_row, me_row, solver_for, tok_s, unembeddings
from jaxens.problem import make_problem


def learned_average_rows(n, val, test, cfg: EvalConfig, all_cost, member_s) -> list[dict]:
    """The learned logit and probability averages (``val_nll``: their final validation loss) and ME."""
    rows = []
    for label, factory in (("logit_average", learn.logit_average_factory),
                           ("prob_average", learn.prob_average_factory)):
        params0 = learn.averaging_params(n)
        params, hist = learn.fit(list(val.logits), val.targets, factory, params0, steps=cfg.learn_steps)
        comb = factory(params)
        run = run_combiner(comb, test.logits, cfg.batch_rows)
        readable = learn.readable(params)
        rows.append(make_row(f"{label} (learned)", "learned", summarize(row_scores(run.logp, test.targets)),
                             tok_s=tok_s(all_cost, run.seconds_per_row), params=readable,
                             note=f"w,T fit on validation ({cfg.learn_steps} Adam steps, "
                                  f"val NLL {hist['loss'][0]:.3f}->{hist['loss'][-1]:.3f})"))
        rows[-1]["val_nll"] = float(hist["loss"][-1])
        if label == "prob_average":
            learned_w = np.asarray(readable["weights"])
            rows.append(me_row("me (learned)", rows[-1], float(np.dot(learned_w, member_s)),
                               "exact = prob_average (learned w, T); one member per step", params=readable))
    return rows


def learned_bottleneck_row(members, v, val, test, cfg: EvalConfig, all_cost, log) -> dict:
    """``kl`` with every member soft, its weights, per-member ``rho`` and ``lambda`` fit on the
    validation rows through the solver's adjoint (:func:`jaxens.learn.bottleneck_kl_factory`)."""
    n = len(members)
    Ws, bs = unembeddings(members, v)
    problem = make_problem(Ws, bs, hard=(), soft=tuple(range(n)), dtype=jnp.float32)
    params0 = learn.bottleneck_params(n, rho=cfg.rho, lam=0.1)
    t0 = time.perf_counter()
    solver = solver_for("kl", cfg)
    factory = lambda params, problem: learn.bottleneck_kl_factory(params, problem, solver)  # noqa: E731
    params, hist = learn.fit(list(val.logits), val.targets, factory, params0,
                             steps=cfg.learn_steps, context=problem, batch_rows=cfg.batch_rows)
    log(f"learned bottleneck kl: {time.perf_counter() - t0:.1f}s")
    comb = factory(params, problem)
    rt = run_combiner(comb, test.logits, cfg.batch_rows)
    readable = learn.readable(params)
    return make_row("bn:kl [soft, learned]", "learned", summarize(row_scores(rt.logp, test.targets)),
                tok_s=1.0 / (all_cost + rt.seconds_per_row), infeasible=float(np.mean(rt.status == 2)),
                iters=float(np.mean(rt.iterations)), lam=readable.get("lam"), params=readable,
                note=f"w, rho_i, lambda fit on validation through the solver (val NLL "
                     f"{hist['loss'][0]:.3f}->{hist['loss'][-1]:.3f})")
